"""What runs write and read: the inversion record, atomic files, the manifest."""
