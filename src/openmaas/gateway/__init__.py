"""The gateway: authenticate, authorise, admit, dispatch, settle."""
