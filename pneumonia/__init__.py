"""PneumoniaMNIST: ResNet-18 at 28x28, MedGemma reports, FAISS case retrieval and Grad-CAM."""
