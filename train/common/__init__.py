"""What every part of the package shares: one-line command-line errors (:mod:`.parsing`), Ctrl-C that
always stops (:mod:`.interrupt`) and the process group of data-parallel runs (:mod:`.distributed`)."""
