"""What goes into an image file besides its pixels' encoding: parameters, watermark, C2PA (encoder.py)."""
