"""The server's limits and defaults, as named constants (no imports: the CLI reads them for --help).

These bound the work one request may ask of a shared server. The ranges of the sampling fields
(stop strings, seed, penalties...) hold for every caller and are declared with the fields, in
:mod:`aquilachat.sampling_params`.
"""

#: Largest request body accepted, in bytes (larger -> 413).
MAX_BODY_BYTES = 1 << 20
#: Most messages in one chat request.
MAX_MESSAGES = 256
#: Most characters in one message or prompt string.
MAX_TEXT_CHARS = 200_000
#: Upper bound of ``max_tokens`` (the context window usually binds first).
MAX_TOKENS_LIMIT = 8192
#: Most answers per prompt (``n``).
MAX_N = 16
#: Most prompts in one ``/v1/completions`` request.
MAX_PROMPTS = 64
#: Most ``[human, assistant]`` pairs in a legacy ``history``.
MAX_HISTORY = 128
#: ``max_tokens`` of ``/v1/completions`` when the request gives none (as OpenAI).
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: ``max_new_tokens`` of ``POST /`` when the request gives none (as the original server).
DEFAULT_LEGACY_MAX_NEW_TOKENS = 256
#: Sequences that may wait for a slot beyond the running ones before requests get 429 (``--max-waiting``).
DEFAULT_MAX_WAITING = 64
#: ``Retry-After`` (seconds) of a 429 when the queue is full.
QUEUE_FULL_RETRY_AFTER_S = 1
#: ``Retry-After`` (seconds) of a 503 while the model is loading.
LOADING_RETRY_AFTER_S = 5

# ---------------------------------------------------------------------------- images
#: Image jobs (generations, edits, carried-out instructions) running at once: one pipeline, one at a time.
MAX_RUNNING_IMAGE_JOBS = 1
#: Image jobs that may wait for the running one before requests get 429.
MAX_WAITING_IMAGE_JOBS = 8
#: Seconds an image job may take (then 504; a diffusers run stops at its next denoising step).
IMAGE_TIMEOUT_S = 600
#: Most images per ``/v1/images/generations`` request (``n``).
MAX_IMAGES_N = 4
#: Most edit steps (lines) in one edit request or ``#InstructFace#`` block.
MAX_EDIT_STEPS = 8
#: Largest body of the routes that carry an image (``/v1/images/edits``, chat with ``aquilachat.image``), in bytes.
MAX_IMAGE_BODY_BYTES = 16 << 20
#: Images kept for ``response_format: "url"`` (the oldest are deleted beyond this).
MAX_STORED_IMAGES = 64
