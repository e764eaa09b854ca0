"""Stage-2 filters: each fills checks, status and reason, and never deletes an annotation."""
