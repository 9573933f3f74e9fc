"""What runs write and read: the inversion record and its null-embedding codec, atomic files, the manifest."""
