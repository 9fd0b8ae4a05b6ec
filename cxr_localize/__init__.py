"""Report-conditioned U-Net that outlines the chest X-ray region a radiology report describes."""
