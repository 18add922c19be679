"""Person identification from face clips: synthetic data, dataset readers, training and evaluation."""
