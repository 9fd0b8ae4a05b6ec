"""BraTS-Path: Prov-GigaPath tiles + VLM captions, cross-attention fusion, challenge scoring (in progress)."""
