"""Control: policy stores, replica sync, calibration and the admin operations. Knows nothing of HTTP."""
