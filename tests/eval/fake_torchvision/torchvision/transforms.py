"""Empty: torchmetrics imports it when torchvision is there (its ARNIQA metric), LPIPS does not use it."""
