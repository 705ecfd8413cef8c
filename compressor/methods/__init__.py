"""The decomposition methods `--method` accepts (names and one-line descriptions; no heavy imports here)."""

METHODS = {
    "whiten": "truncation-aware whitening (SVD-LLM): the calibration output-error optimum",
    "svd": "plain truncated SVD of the weights (the baseline)",
    "asvd": "activation-aware SVD (ASVD): per-channel scale mean|x|^alpha",
    "corda": "CorDA: SVD of W times the input covariance, top components kept",
    "fwsvd": "Fisher-weighted SVD (FWSVD); needs backward passes over the whole model, memory as in training "
             "on one window",
}
