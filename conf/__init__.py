"""imgcls's Hydra configs: a package (imgcls.conf) so that a wheel ships them and every command finds them."""
