"""Export: the per-user vector store (add, update, forget, decay, compress), and llama.cpp GGUF control vectors.

The store is crash safe (atomic writes, the index as commit point) and holds vectors and metadata
only, never a user's texts.
"""

from .compress import BASIS_FORMAT, COMPRESSED_FORMAT, CompressionReport, steering_effect
from .gguf import GGUFExport, export_gguf, import_gguf, read_gguf_directions
from .vectors import INDEX_FORMAT, RUNNING_MEAN_METHODS, UnknownUserError, VectorStore, save_edits

__all__ = [
    "BASIS_FORMAT", "COMPRESSED_FORMAT", "INDEX_FORMAT", "RUNNING_MEAN_METHODS", "CompressionReport", "GGUFExport", "UnknownUserError",
    "VectorStore", "export_gguf", "import_gguf", "read_gguf_directions", "save_edits", "steering_effect",
]
