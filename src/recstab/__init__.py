"""recstab: diagnosing and preventing instabilities in recurrent video restoration."""

__version__ = "0.1.0"
