"""Whether a Postgres store's appends predict the heads (the stream's version, the log's
last position) and so take one round trip instead of two."""

from __future__ import annotations


class Predictor:
    """Whether appends predict the log's last position: while this store seems to be
    the schema's only writer, which it assumes until shown otherwise.

    While predicting, the appends of this process take turns (``PostgresEventStore.
    _append_once``), so the last position this store committed is the log's, unless another
    process appended. Then a prediction fails: it costs a round trip and a second wait
    for the lock, so the store stops predicting, and its appends queue for the lock in
    the server, reading the heads under it. When one finds this store's own last event
    still the last, nobody else appended in between; ``needed`` of those in a row and it
    predicts again, ``needed`` doubling after each wrong prediction (up to 1,024): busy
    neighbours soon stop it for good, a lone writer predicts from its second append on.
    Its fields are read and written without a lock: a race can only make a prediction
    wrong, and the database checks every prediction."""

    MOST_NEEDED = 1_024

    def __init__(self) -> None:
        self.last_position: int | None = None  # the last one this store committed
        self.available = True  # False on a schema without begin_append
        self._predicting = True
        self._alone = 0  # locked appends in a row that found no one else's events
        self._needed = 1

    @property
    def predicting(self) -> bool:
        return self.available and self._predicting

    def guess(self) -> int | None:
        return self.last_position if self.predicting else None

    def committed(self, position: int) -> None:
        if self.last_position is None or position > self.last_position:
            self.last_position = position

    def observed(self, last_position: int) -> None:
        """The locked path read the real last position."""
        if self.last_position is not None and last_position == self.last_position:
            self._alone += 1
            self._predicting = self._predicting or self._alone >= self._needed
        else:
            self._alone = 0

    def missed(self) -> None:
        self._predicting = False
        self._alone = 0
        self._needed = min(self._needed * 2, self.MOST_NEEDED)

    def unavailable(self) -> None:
        self.available = False
