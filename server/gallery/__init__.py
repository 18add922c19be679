"""The enrolment gallery: collections -> persons -> templates, and how probes are matched against it."""
