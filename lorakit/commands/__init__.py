"""One module per command; each exposes a library function of the command's name (re-exported by `lorakit`)."""
