"""What PaliGemma's answers mean beyond text: `<loc>` boxes (`detection`), `<seg>` masks through
big_vision's VQ-VAE decoder (`segmentation`), and both drawn on the image (`draw`)."""
