"""Per-layer execution plans: the on-disk plan cache (:mod:`.cache`) and the candidate timer (:mod:`.timing`)."""
