#!/usr/bin/env bash
# First start: export ONNX from the weights (sha256-checked), then build the TensorRT engines for this GPU.
# Later starts find both cached in /app/model_repository and start at once.
#
# Authentication is always on (the server refuses a public address without it):
#   FACEGATE_TOKEN_FILE   a mounted secret of bearer tokens, one a line (default /run/secrets/facegate_token);
#                         its caller gets FACEGATE_TOKEN_SCOPES (default: all scopes)
#   FACEGATE_CONFIG       a TOML file with [[auth.callers]] (token hashes, scopes), e.g. from a mounted Secret
#   FACEGATE_TLS_CERT / FACEGATE_TLS_KEY, and FACEGATE_CLIENT_CA for mutual TLS; with TLS, FACEGATE_TLS_SERVER_NAMES
#                         (the names clients dial, comma-separated: the certificate must name each) and
#                         FACEGATE_TLS_TRUST_ROOTS (the roots clients trust: the served chain must verify up to them)
#   FACEGATE_HEALTH_PORT  a plaintext port serving grpc.health.v1 alone, for Kubernetes' gRPC probes, which cannot
#                         speak TLS
# Weights: FACEGATE_WEIGHTS_DIR names a mounted folder laid out like shared/models; without it they are downloaded
# from their pinned upstream, or from a mirror laid out the same way (FACEGATE_WEIGHTS_URL), sha256-checked, into
# the model volume once per volume (the only place the image's user can write: Kubernetes runs it as an unnamed
# user).
# FACEGATE_PREPARE=0 skips the export and engine build (models already in the volume); FACEGATE_TENSORRT=0 (the CPU
# image) skips the engine build alone.
set -euo pipefail
# IdentifyFromClip needs an identification ensemble, which the image does not train (no SlowFast weights exist; the
# project trains its own on synthetic clips, and every replica sharing a gallery must serve the same one). Pack it
# once where it was trained (`make ensemble-bundle`) and name the file: FACEGATE_ENSEMBLE, a path in a mounted volume
# or an http(s) URL, and FACEGATE_ENSEMBLE_SHA256, its pinned sha256. It is checked, then installed into the models
# volume (once; a restart finds it), before the engine build so that a GPU pod builds the members' engines too. A
# bundle that does not check out stops the start, with the reason.
if [ -n "${FACEGATE_ENSEMBLE:-}" ]; then
  python3 -m engines.identify.bundle install "$FACEGATE_ENSEMBLE" --repository model_repository \
    --sha256 "${FACEGATE_ENSEMBLE_SHA256:?FACEGATE_ENSEMBLE_SHA256 must pin the bundle that FACEGATE_ENSEMBLE names}"
fi
if [ "${FACEGATE_PREPARE:-1}" != 0 ]; then
  python3 -m engines.prepare --repository model_repository --cache-dir model_repository/.weights
  if [ "${FACEGATE_TENSORRT:-1}" != 0 ]; then
    python3 -m engines.tensorrt.build --repository model_repository --precision "${FACEGATE_PRECISION:-fp16}" \
      || echo "entrypoint: no TensorRT engines built (see above); the server falls back to ONNX Runtime" >&2
  fi
fi
# Reduced precision on the CPU (bf16 where the CPU has it, INT8) is served only where its parity gate passed for
# these models on this machine class. FACEGATE_LIVENESS_SAMPLES (a mounted folder of labelled liveness images, as
# the Makefile's LIVENESS_SAMPLES) runs the liveness gate when a verdict is missing or stale: at the first start on
# each node with a pod-local repository, and after the models or the CPU class change. Without it, FP32 is served.
if [ -n "${FACEGATE_LIVENESS_SAMPLES:-}" ]; then
  python3 -m engines.liveness_gate --if-stale --samples "$FACEGATE_LIVENESS_SAMPLES" --repository model_repository \
    >/dev/null || echo "entrypoint: the liveness parity gate did not run (see above); models without a verdict for this CPU serve FP32" >&2
  # The identification gate too, where an installed ensemble's verdicts are for another CPU type: its bundle's gate
  # set names the face photo (one of these samples) its synthetic clips are regenerated from (about 45 s
  # on 2 CPUs, once per volume and CPU type; the clips are removed after).
  python3 -m engines.identify.gate_set --samples "$FACEGATE_LIVENESS_SAMPLES" --repository model_repository \
    >/dev/null || echo "entrypoint: the identification parity gate did not run (see above); members without a verdict for this CPU serve FP32" >&2
fi
args=(--host 0.0.0.0 --port "${PORT:-50051}" --model-repository model_repository --audit-log "${FACEGATE_AUDIT_LOG:--}")
token_file="${FACEGATE_TOKEN_FILE:-/run/secrets/facegate_token}"
if [ -f "$token_file" ]; then
  args+=(--token-file "$token_file" --token-scopes "${FACEGATE_TOKEN_SCOPES:-liveness,identify,enrol,operator}")
fi
[ -n "${FACEGATE_CONFIG:-}" ] && args+=(--config "$FACEGATE_CONFIG")
[ -n "${FACEGATE_TLS_CERT:-}" ] && args+=(--tls-cert "$FACEGATE_TLS_CERT" --tls-key "${FACEGATE_TLS_KEY:?FACEGATE_TLS_KEY}")
[ -n "${FACEGATE_CLIENT_CA:-}" ] && args+=(--client-ca "$FACEGATE_CLIENT_CA")
[ -n "${FACEGATE_TLS_TRUST_ROOTS:-}" ] && args+=(--tls-trust-roots "$FACEGATE_TLS_TRUST_ROOTS")
if [ -n "${FACEGATE_TLS_SERVER_NAMES:-}" ]; then
  IFS=, read -ra names <<< "$FACEGATE_TLS_SERVER_NAMES"
  for name in "${names[@]}"; do args+=(--tls-server-name "$name"); done
fi
[ -n "${FACEGATE_HEALTH_PORT:-}" ] && args+=(--health-port "$FACEGATE_HEALTH_PORT")
exec python3 -m server "${args[@]}" "$@"
