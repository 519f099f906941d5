"""The cache: stage signatures, what identifies a base and a data folder, and the locks that
let many processes share one artifacts folder."""
