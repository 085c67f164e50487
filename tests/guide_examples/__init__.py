"""The backend classes of docs' custom_backends_guide, verbatim, one module per example.

Code between the guide's lines is copied unchanged; only the places the guide marks
"Implement required methods..." / "Implement other required methods..." / "Delegate other
methods..." are filled in, each inside a clearly marked FILLED-IN block. Every
``_backend_type`` is defined exactly once in the test suite (a second class claiming the same
name would be a DuplicateBackendError by design).
"""
