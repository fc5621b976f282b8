"""What tests, benchmarks and developers use beside the library, kept out of the installed
package: tiny datasets in the official layouts (:mod:`devtools.fixtures`), the mutation
campaign over the readers (``python -m devtools.fuzz``) and CPU memory measurement
(:mod:`devtools.profiling`). Run from a checkout of the repository."""
