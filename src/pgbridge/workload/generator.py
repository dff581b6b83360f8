"""The concurrent workload: threads of shop users running real transactions through one endpoint.

Each worker owns one connection and follows its own open-loop schedule, so the offered rate does
not drop when the database slows down (latency shows it instead). Order placement takes stock with
a conditional `UPDATE ... WHERE stock >= qty` per line, in product order (no deadlocks between
orders), inside the transaction that writes the order: the shop never oversells, and the CHECK on
`inventory.stock` would refuse it if a bug tried. Cancellations and refunds put the stock back.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from pgbridge.types import quote_ident
from pgbridge.workload.mix import Mix, Schedule
from pgbridge.workload.stats import Recorder

CATEGORIES = ("kitchen", "home", "outdoor", "audio", "furniture", "office", "fashion", "sport")
WORDS = ("kettle", "lamp", "backpack", "headphones", "chair", "notebook", "sneakers", "watch", "blender", "jacket")
RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.LockNotAvailable)


class Rejected(Exception):
    """The transaction was refused by the shop's rules (out of stock): rolled back, not an error."""


class Noop(Exception):
    """Nothing to do (no pending payment to settle, say): rolled back, counted apart."""


@dataclass(frozen=True)
class Target:
    dsn: str
    schema: str
    pooled: bool  # through PgBouncer in transaction mode: no server-side prepared statements


class Shop:
    """The transactions of the mix, on one connection."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str, rng: random.Random) -> None:
        self.c = conn
        self.s = quote_ident(schema)
        self.rng = rng
        row = conn.execute(
            f"SELECT (SELECT max(id) FROM {self.s}.customers), (SELECT max(id) FROM {self.s}.products)".encode()
        ).fetchone()
        self.customers = int(row[0] or 0) if row else 0
        self.products = int(row[1] or 0) if row else 0
        if not self.customers or not self.products:
            raise Noop("the catalogue is empty: load it first (`pgbridge workload load`)")

    def q(self, text: str, params: tuple[Any, ...] | list[Any] = ()) -> psycopg.Cursor[Any]:
        return self.c.execute(text.replace("{s}", self.s).encode(), params)

    def customer(self) -> int:
        return self.rng.randint(1, self.customers)

    def product(self) -> int:
        return self.rng.randint(1, self.products)

    # -- the mix -------------------------------------------------------------------------------
    def register(self) -> None:
        email = f"u-{uuid.uuid4().hex[:16]}@example.com"
        row = self.q(
            "INSERT INTO {s}.customers (email, full_name, country, profile)"
            " VALUES (%s, %s, %s, jsonb_build_object('newsletter', %s::boolean, 'segment', 'new')) RETURNING id",
            (email, f"Customer {email[:10]}", self.rng.choice(("US", "DE", "FR", "GB", "JP")), self.rng.random() < 0.3),
        ).fetchone()
        assert row is not None
        self.q("INSERT INTO {s}.carts (customer_id) VALUES (%s)", (row[0],))
        self.customers = max(self.customers, int(row[0]))

    def search(self) -> None:
        word = self.rng.choice(WORDS)
        category = self.rng.choice(CATEGORIES)
        low = self.rng.randint(5, 400)
        found = self.q(
            "SELECT id FROM {s}.products WHERE category = %s AND price BETWEEN %s AND %s"
            " AND name ILIKE %s ORDER BY price LIMIT 20",
            (category, low, low + 100, f"%{word}%"),
        ).fetchall()
        clicked = self.rng.choice(found)[0] if found and self.rng.random() < 0.7 else None
        who = None if self.rng.random() < 0.25 else self.customer()
        self.q(
            "INSERT INTO {s}.search_log (customer_id, query, results, product_id) VALUES (%s, %s, %s, %s)",
            (who, f"{word} {category}", len(found), clicked),
        )

    def add_to_cart(self) -> None:
        cart = self.q(
            "INSERT INTO {s}.carts (customer_id) VALUES (%s)"
            " ON CONFLICT (customer_id) DO UPDATE SET updated_at = now() RETURNING id",
            (self.customer(),),
        ).fetchone()
        assert cart is not None
        self.q(
            "INSERT INTO {s}.cart_items (cart_id, product_id, qty) VALUES (%s, %s, %s)"
            " ON CONFLICT (cart_id, product_id) DO UPDATE SET qty = least({s}.cart_items.qty + 1, 5)",
            (cart[0], self.product(), self.rng.randint(1, 2)),
        )

    def place_order(self) -> None:
        who = self.customer()
        cart = self.q(
            "SELECT ci.product_id, ci.qty, c.id FROM {s}.carts c JOIN {s}.cart_items ci ON ci.cart_id = c.id"
            " WHERE c.customer_id = %s",
            (who,),
        ).fetchall()
        if cart and self.rng.random() < 0.8:
            wanted = {int(p): int(q) for p, q, _ in cart}
            cart_id: int | None = int(cart[0][2])
        else:
            wanted = {self.product(): self.rng.randint(1, 3) for _ in range(self.rng.randint(1, 4))}
            cart_id = None
        lines: list[tuple[int, int, Any]] = []
        for product_id in sorted(wanted):  # one lock order for every transaction: no deadlocks
            qty = wanted[product_id]
            row = self.q(
                "UPDATE {s}.inventory i SET stock = i.stock - %s, updated_at = now() FROM {s}.products p"
                " WHERE i.product_id = %s AND p.id = i.product_id AND i.stock >= %s RETURNING p.price",
                (qty, product_id, qty),
            ).fetchone()
            if row is None:
                raise Rejected(f"product {product_id} is out of stock")
            lines.append((product_id, qty, row[0]))
        total = sum(q * price for _, q, price in lines)
        order = self.q(
            "INSERT INTO {s}.orders (customer_id, status, total, shipping)"
            " VALUES (%s, 'pending', %s, jsonb_build_object('city', %s::text, 'express', %s::boolean)) RETURNING id",
            (who, total, f"City {self.rng.randint(1, 997)}", self.rng.random() < 0.2),
        ).fetchone()
        assert order is not None
        self.q(
            "INSERT INTO {s}.order_items (order_id, line_no, product_id, qty, unit_price)"
            " SELECT %s, n, p, q, u"
            " FROM unnest(%s::bigint[], %s::int[], %s::numeric[]) WITH ORDINALITY AS t(p, q, u, n)",
            (order[0], [p for p, _, _ in lines], [q for _, q, _ in lines], [u for _, _, u in lines]),
        )
        self.q(
            "INSERT INTO {s}.payments (order_id, amount, method, status) VALUES (%s, %s, %s, 'pending')",
            (order[0], total, self.rng.choice(("card", "paypal", "bank"))),
        )
        if cart_id is not None:
            self.q("DELETE FROM {s}.cart_items WHERE cart_id = %s", (cart_id,))

    def _restore_stock(self, order_id: int) -> None:
        self.q(
            "UPDATE {s}.inventory i SET stock = i.stock + t.qty, updated_at = now()"
            " FROM (SELECT product_id, sum(qty) AS qty FROM {s}.order_items WHERE order_id = %s"
            "       GROUP BY product_id ORDER BY product_id) t WHERE i.product_id = t.product_id",
            (order_id,),
        )

    def pay(self) -> None:
        """A payment gateway answers: most pending payments are captured, some fail."""
        row = self.q(
            "SELECT id, order_id FROM {s}.payments WHERE status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        ).fetchone()
        if row is None:
            raise Noop("no pending payment")
        payment_id, order_id = row
        if self.rng.random() < 0.92:
            self.q(
                "UPDATE {s}.payments SET status = 'captured', updated_at = now(),"
                " gateway = jsonb_build_object('ref', md5(id::text), 'captured', true) WHERE id = %s",
                (payment_id,),
            )
            self.q("UPDATE {s}.orders SET status = 'paid', updated_at = now() WHERE id = %s", (order_id,))
        else:
            self.q("UPDATE {s}.payments SET status = 'failed', updated_at = now() WHERE id = %s", (payment_id,))
            self.q("UPDATE {s}.orders SET status = 'cancelled', updated_at = now() WHERE id = %s", (order_id,))
            self._restore_stock(order_id)

    def ship(self) -> None:
        row = self.q(
            "UPDATE {s}.orders SET status = 'shipped', updated_at = now() WHERE id = ("
            " SELECT id FROM {s}.orders WHERE status = 'paid' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
        ).fetchone()
        if row is None:
            raise Noop("nothing to ship")

    def cancel(self) -> None:
        """The customer cancels an unpaid order: the pending payment is deleted, stock comes back."""
        row = self.q(
            "SELECT id FROM {s}.orders WHERE status = 'pending' ORDER BY id DESC LIMIT 1 FOR UPDATE SKIP LOCKED"
        ).fetchone()
        if row is None:
            raise Noop("no pending order")
        self.q("DELETE FROM {s}.payments WHERE order_id = %s", (row[0],))
        self.q("UPDATE {s}.orders SET status = 'cancelled', updated_at = now() WHERE id = %s", (row[0],))
        self._restore_stock(row[0])

    def refund(self) -> None:
        """A recent paid or shipped order is returned: payment refunded, stock back."""
        row = self.q(
            "SELECT id FROM {s}.orders WHERE status IN ('paid', 'shipped')"
            " AND id > (SELECT max(id) - 2000 FROM {s}.orders) ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED"
        ).fetchone()
        if row is None:
            raise Noop("no order to refund")
        self.q("UPDATE {s}.orders SET status = 'refunded', updated_at = now() WHERE id = %s", (row[0],))
        self.q("UPDATE {s}.payments SET status = 'refunded', updated_at = now() WHERE order_id = %s", (row[0],))
        self._restore_stock(row[0])

    def restock(self) -> None:
        self.q(
            "UPDATE {s}.inventory SET stock = stock + 100, updated_at = now() WHERE product_id IN ("
            " SELECT product_id FROM {s}.inventory WHERE stock < 10"
            " ORDER BY product_id LIMIT 20 FOR UPDATE SKIP LOCKED)"
        )


def connect(target: Target) -> psycopg.Connection[Any]:
    conn = psycopg.connect(target.dsn, autocommit=True, connect_timeout=10, application_name="pgbridge-workload")
    if target.pooled:
        conn.prepare_threshold = None  # PgBouncer transaction pooling hands each transaction any server
    return conn


class Workload:
    """`workers` threads offering `rate` transactions/s in total until `stop` is set or `duration` ends."""

    def __init__(
        self,
        target: Target,
        rate: float,
        *,
        workers: int = 4,
        duration: float | None = None,
        mix: Mix | None = None,
        seed: int | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.target = target
        self.rate = rate
        self.workers = max(1, workers)
        self.duration = duration
        self.mix = mix or Mix()
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.recorder = recorder or Recorder()
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.fatal: str | None = None

    def start(self) -> None:
        start = time.monotonic() + 0.05
        per_worker = self.rate / self.workers
        for i in range(self.workers):
            sched = Schedule(start, per_worker, phase=i / self.rate)
            t = threading.Thread(target=self._worker, args=(i, sched), name=f"workload-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """Start, wait until the duration ends (or `stop`), stop the workers and wait for them."""
        self.start()
        end = None if self.duration is None else time.monotonic() + self.duration
        try:
            while not self.stop.is_set() and (end is None or time.monotonic() < end):
                self.stop.wait(0.2 if end is None else max(0.0, min(0.2, end - time.monotonic())))
                if on_tick:
                    on_tick()
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        self.join(30)
        self.recorder.stop()

    def _worker(self, index: int, sched: Schedule) -> None:
        rng = random.Random(self.seed * 1000 + index)
        shop: Shop | None = None
        backoff = 0.2
        while not self.stop.is_set():
            if shop is None:
                try:
                    shop = Shop(connect(self.target), self.target.schema, rng)
                    backoff = 0.2
                except Noop as e:
                    self.fatal = str(e)
                    self.stop.set()
                    return
                except psycopg.Error as e:
                    self.recorder.error("connect", str(e))
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 5)
                    continue
            due = sched.due(time.monotonic())
            wait = due - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                break
            kind = self.mix.pick(rng)
            try:
                self._one(shop, kind)
            except psycopg.OperationalError as e:
                self.recorder.error(kind, str(e))
                if shop.c.closed or shop.c.broken:
                    shop.c.close()
                    shop = None
            except Exception as e:  # a bug must stop the run loudly, not quietly lower its rate
                self.fatal = f"{kind}: {e}"
                self.stop.set()
                break
        if shop is not None:
            shop.c.close()

    def _one(self, shop: Shop, kind: str) -> None:
        fn: Callable[[], None] = getattr(shop, kind)
        for attempt in range(3):
            started = time.monotonic()
            try:
                with shop.c.transaction():
                    fn()
                self.recorder.record(kind, time.monotonic() - started)
                return
            except Rejected:
                self.recorder.record(kind, time.monotonic() - started, "rejected")
                return
            except Noop:
                self.recorder.record(kind, time.monotonic() - started, "noop")
                return
            except RETRYABLE as e:
                if attempt == 2:
                    self.recorder.error(kind, str(e))
            except psycopg.OperationalError:
                raise
            except psycopg.Error as e:
                self.recorder.error(kind, str(e))
                return
