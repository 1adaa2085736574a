"""What the mesh's front ends share, the HTTP gateway and the batch plugin alike: submitting a request
to the mesh and following it (``core``: ``Gateway``, ``Pending``, ``RequestFailed``, ``ServedModel``),
the OpenAI API's bodies and answers (``openai_api``) and a front end's metrics (``metrics``)."""
