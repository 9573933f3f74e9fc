"""What runs write and read: the inversion record and its null-embedding codec, atomic files, the record log
(manifest lines and the index that commits them) and its readers."""
