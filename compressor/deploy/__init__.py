"""Files shipped verbatim in a deploy bundle (run_on_device.py); they import nothing from compressor."""
