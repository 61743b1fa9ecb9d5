"""Loading data: the dataset registry, its loaders and the class-disjoint protocol."""
