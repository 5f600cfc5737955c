"""Errors in the user's input. The CLI shows their message alone, without a traceback, and exits 2."""


class UserError(ValueError):
    """Bad input that the user can fix; the message names the key, file or value and what to do."""

    def __init__(self, *args):
        # raised in a DataLoader worker, it comes back as type(exc)("Caught ... in DataLoader worker
        # process 0.\nOriginal Traceback ...\n<module>.<Class>: <message>"): keep the message alone
        if args and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            name = f"{type(self).__module__}.{type(self).__qualname__}: "
            head, found, message = args[0].rpartition(name)
            if found:
                args = (message.strip(), *args[1:])
        super().__init__(*args)


class ConfigError(UserError):
    """A config value that cannot be built; the message names the key."""


class DataError(UserError):
    """A problem with the user's data tree, reported before any training starts."""
