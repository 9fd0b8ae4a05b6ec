"""3D brain MRI report generation: inflated MedSigLIP, a Perceiver resampler and MedGemma, on BraTS FLAIR volumes."""
