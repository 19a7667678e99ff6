"""copyfree training: datasets, detection CVAE, retrieval hashing, export to bundles."""
