"""What an upstream (Ollama, an OpenAI-compatible server) may send, bounded: the sizes read,
the counts and durations believed, the length of an answer relayed.

An upstream is untrusted like a caller: a broken or hostile one must cost a call, never the
gateway's memory, its event loop, a tenant's budget or a status that says the gateway broke.
Every bound of the HTTP backends' reading side lives here (docs/upstreams.md, "What an
upstream can send").
"""

from __future__ import annotations

import math

from agentloop.domain import GenerationRequest, Usage

# --- sizes read ----------------------------------------------------------------------------

#: The longest line of a Server-Sent Events stream, and the largest event (its data lines
#: together). A streamed chunk carries a token or a few; a megabyte is far beyond one.
MAX_EVENT_BYTES = 1 << 20
#: The longest NDJSON line of an Ollama stream: its final /api/generate chunk carries the
#: `context` (a number per token of the context: about 7 bytes each, a 128K context under
#: 1 MiB).
MAX_NDJSON_LINE_BYTES = 4 << 20
#: The largest answer to a control call (model lists, /api/show, /api/version, a load).
MAX_CONTROL_ANSWER_BYTES = 4 << 20
#: Answers larger than this are parsed on a thread: the event loop keeps serving.
PARSE_OFF_LOOP_BYTES = 256 << 10
#: An embeddings answer: a head, then per text asked a vector of 8192 numbers of 32 bytes
#: each, and 4 KiB per character of the text (a server without pooling answers a vector per
#: token: 640 numbers of 25 bytes for a token of about 4 characters on Gemma 3 270M); never
#: more than MAX_EMBEDDINGS_ANSWER_BYTES.
EMBEDDINGS_HEAD_BYTES = 64 << 10
EMBEDDING_BYTES_PER_TEXT = 8192 * 32
EMBEDDING_BYTES_PER_CHAR = 4 << 10
MAX_EMBEDDINGS_ANSWER_BYTES = 64 << 20
#: The most of an error body read (Ollama's message, cleaned; OpenAI's only logged).
ERROR_BODY_BYTES = 16 << 10

# --- the end of a stream -------------------------------------------------------------------

#: After `[DONE]` (or Ollama's done chunk) the body should end at once; what follows is read
#: for at most this long and this many bytes (so a well-behaved connection goes back to the
#: pool), then the connection is dropped.
END_GRACE_SECONDS = 0.25
END_TRAILER_BYTES = 64 << 10

# --- an answer's length --------------------------------------------------------------------

#: Stream events (chunks) an answer may take beyond max_tokens: the role chunk, the finish
#: chunk, usage, chunks that carry no text. Past max_tokens deltas with text, or past this
#: many more events, the answer is cut: finish reason LENGTH, the upstream closed.
EVENT_SLACK = 64
#: Characters an answer may take: a floor, then this many per token asked (tokens average
#: about 4 characters; the longest in common vocabularies are runs of a few dozen).
ANSWER_CHARS_FLOOR = 64 << 10
CHARS_PER_TOKEN = 64

# --- counts and durations ------------------------------------------------------------------

#: The most tokens any count an upstream reports is believed up to.
MAX_REPORTED_TOKENS = 10_000_000
#: The most bytes a model's size is believed up to (a petabyte), and dimensions a vector.
MAX_REPORTED_BYTES = 1 << 50
MAX_EMBEDDING_DIMENSIONS = 65536
#: Output tokens reported beyond max_tokens (an end-of-turn token, counting differences).
OUTPUT_TOKEN_SLACK = 16
#: A prompt's tokens: at most one per UTF-8 byte (4 per character), plus a chat template's
#: per turn and an image's.
TEMPLATE_TOKENS_PER_TURN = 64
TOKENS_PER_IMAGE = 4096

#: What interpreting an upstream's parsed JSON can raise when it is not the expected shape:
#: caught wherever an answer is read, so none of it reaches a caller as INTERNAL or UNKNOWN.
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
             RecursionError)


def count(value: object, most: int) -> int:
    """A count the upstream reported, within [0, most]; 0 (not reported) for anything but a
    non-negative integer (floats, NaN, booleans, strings)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    return min(value, most)


def seconds(value: object, unit: float, most: float) -> float | None:
    """A duration the upstream reported in `unit` seconds (1e-9 for nanoseconds), within
    [0, most]; None (not reported) for anything but a finite non-negative number."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0:
        return None
    if value >= most / unit:  # compared before scaling: a huge int would overflow a float
        return most
    return value * unit


def answer_chars(max_tokens: int) -> int:
    """The most characters of text relayed for an answer of max_tokens."""
    return ANSWER_CHARS_FLOOR + CHARS_PER_TOKEN * max(0, max_tokens)


def prompt_tokens(request: GenerationRequest) -> int:
    """The most tokens a prompt can be: tokenizers give at most one per byte."""
    turns = (request.prompt,) if request.prompt is not None else tuple(
        message.content for message in request.messages)
    chars = len(request.system) + sum(len(text) for text in turns)
    images = sum(len(message.images) for message in request.messages)
    most = 4 * chars + TEMPLATE_TOKENS_PER_TURN * (len(turns) + 1) + TOKENS_PER_IMAGE * images
    return min(most, MAX_REPORTED_TOKENS)


def texts_tokens(texts: tuple[str, ...]) -> int:
    """The most tokens a batch of texts can be (embeddings)."""
    return min(sum(4 * len(text) + TEMPLATE_TOKENS_PER_TURN for text in texts),
               MAX_REPORTED_TOKENS)


def usage(request: GenerationRequest, input_tokens: object, output_tokens: object,
          cached_tokens: object = 0) -> Usage:
    """An upstream's usage for a generation, each count clamped to what the call can have
    cost: the prompt's bound, max_tokens and a little, the cached part of the prompt."""
    prompt = count(input_tokens, prompt_tokens(request))
    return Usage(input_tokens=prompt,
                 output_tokens=count(output_tokens,
                                     request.options.max_tokens + OUTPUT_TOKEN_SLACK),
                 cached_input_tokens=count(cached_tokens, prompt))


def finite(vector: tuple[float, ...]) -> bool:
    """Every number of a vector finite: NaN and infinities fail, and so does a vector whose
    sum leaves a float's range."""
    try:
        return math.isfinite(math.fsum(vector))
    except (ValueError, OverflowError):  # inf - inf; an overflow on the way
        return False


def embeddings_answer_bytes(texts: tuple[str, ...]) -> int:
    """The largest embeddings answer read for a batch of `texts`."""
    return min(EMBEDDINGS_HEAD_BYTES + sum(
        EMBEDDING_BYTES_PER_TEXT + EMBEDDING_BYTES_PER_CHAR * len(text) for text in texts),
        MAX_EMBEDDINGS_ANSWER_BYTES)
