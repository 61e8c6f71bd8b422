"""One chunk step of ``KVCache``: device time per chunk, its host time, and both against video length."""
