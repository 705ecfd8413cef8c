"""What repairs or undoes a compression: EoRA compensation, densify."""
