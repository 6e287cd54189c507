"""Code shared by training and serving: encoder definitions, retrieval and the bundle format."""
