"""Deterministic fake PII for the demo `shop` database (customers, api_keys, orders)."""

from __future__ import annotations

import datetime as dt
import random
import string
from dataclasses import dataclass
from decimal import Decimal

__all__ = [
    "SCHEMA_SQL",
    "ApiKey",
    "Customer",
    "Order",
    "SampleData",
    "generate",
    "luhn_check_digit",
    "luhn_valid",
]

DEFAULT_SEED = 20240229
# Timestamps are relative to a fixed instant, not now(), so output is reproducible.
_EPOCH = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)

SCHEMA_SQL = """
CREATE TABLE customers (
    id            integer PRIMARY KEY,
    full_name     text NOT NULL,
    email         text NOT NULL UNIQUE,
    phone         text NOT NULL,
    ssn           text NOT NULL,
    card_number   text NOT NULL,
    date_of_birth date NOT NULL,
    address       text NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE TABLE api_keys (
    id          integer PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    service     text NOT NULL,
    key         text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL
);
CREATE TABLE orders (
    id          integer PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    amount      numeric(10, 2) NOT NULL,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
CREATE INDEX api_keys_customer_id_idx ON api_keys (customer_id);
"""

_FIRST = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Lisa",
    "Daniel",
    "Nancy",
    "Matthew",
    "Betty",
    "Anthony",
    "Margaret",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Kenneth",
    "Carol",
    "Kevin",
    "Amanda",
    "Brian",
    "Dorothy",
    "George",
    "Melissa",
    "Timothy",
    "Deborah",
    "Aisha",
    "Mateo",
    "Priya",
    "Wei",
    "Olga",
    "Kenji",
    "Fatima",
    "Lars",
    "Chiara",
    "Tomasz",
    "Ngozi",
    "Diego",
    "Ingrid",
]
_LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Okafor",
    "Tanaka",
    "Kowalski",
    "Rossi",
    "Novak",
    "Jensen",
    "Haddad",
    "Patel",
    "Chen",
    "Ivanova",
]
_STREETS = [
    "Oak Street",
    "Maple Avenue",
    "Cedar Lane",
    "Pine Road",
    "Elm Street",
    "Washington Avenue",
    "Lake Drive",
    "Hillcrest Road",
    "Sunset Boulevard",
    "Park Place",
    "River Road",
    "Main Street",
    "Church Street",
    "Highland Avenue",
    "Meadow Lane",
    "Forest Drive",
    "Spring Street",
    "Valley View Road",
    "Mill Road",
    "Chestnut Street",
]
_CITIES = (
    ("Springfield", "IL", "627"),
    ("Portland", "OR", "972"),
    ("Austin", "TX", "787"),
    ("Madison", "WI", "537"),
    ("Burlington", "VT", "054"),
    ("Boulder", "CO", "803"),
    ("Savannah", "GA", "314"),
    ("Ann Arbor", "MI", "481"),
    ("Raleigh", "NC", "276"),
    ("Tucson", "AZ", "857"),
)
_MAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.com")
_SERVICES = ("billing", "shipping", "analytics", "webhooks", "search")
_STATUSES = ("pending", "paid", "shipped", "delivered", "refunded", "cancelled")
_STATUS_WEIGHTS = (8, 20, 15, 50, 4, 3)
_CARD_PREFIXES = ("4", "51", "52", "53", "54", "55", "6011")
_KEY_ALPHABET = string.ascii_letters + string.digits


def luhn_check_digit(partial: str) -> str:
    """The Luhn check digit to append to `partial` (a string of digits)."""
    total = 0
    # Walking right-to-left over the partial number, every first, third, ... digit is doubled
    # because the check digit will occupy the rightmost (undoubled) position.
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    """True if `number` is all digits and passes the Luhn checksum."""
    if not number.isdigit() or len(number) < 2:
        return False
    return luhn_check_digit(number[:-1]) == number[-1]


@dataclass(frozen=True)
class Customer:
    """One customer row."""

    id: int
    full_name: str
    email: str
    phone: str
    ssn: str
    card_number: str
    date_of_birth: dt.date
    address: str
    created_at: dt.datetime

    def row(self) -> tuple[object, ...]:
        """Column values in table order (for COPY)."""
        return (
            self.id,
            self.full_name,
            self.email,
            self.phone,
            self.ssn,
            self.card_number,
            self.date_of_birth,
            self.address,
            self.created_at,
        )


@dataclass(frozen=True)
class ApiKey:
    """One api_keys row."""

    id: int
    customer_id: int
    service: str
    key: str
    created_at: dt.datetime

    def row(self) -> tuple[object, ...]:
        """Column values in table order (for COPY)."""
        return (self.id, self.customer_id, self.service, self.key, self.created_at)


@dataclass(frozen=True)
class Order:
    """One orders row."""

    id: int
    customer_id: int
    amount: Decimal
    status: str
    created_at: dt.datetime

    def row(self) -> tuple[object, ...]:
        """Column values in table order (for COPY)."""
        return (self.id, self.customer_id, self.amount, self.status, self.created_at)


@dataclass(frozen=True)
class SampleData:
    """All generated rows."""

    customers: list[Customer]
    api_keys: list[ApiKey]
    orders: list[Order]


CUSTOMER_COLUMNS = (
    "id",
    "full_name",
    "email",
    "phone",
    "ssn",
    "card_number",
    "date_of_birth",
    "address",
    "created_at",
)
API_KEY_COLUMNS = ("id", "customer_id", "service", "key", "created_at")
ORDER_COLUMNS = ("id", "customer_id", "amount", "status", "created_at")


def _ssn(rng: random.Random) -> str:
    # Areas 000, 666 and 900-999 are never issued; staying outside them keeps the values
    # shape-valid so SSN detectors (and masking rules) fire on them.
    area = rng.randint(1, 898)
    if area >= 666:
        area += 1
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def _card(rng: random.Random) -> str:
    prefix = rng.choice(_CARD_PREFIXES)
    body = prefix + "".join(rng.choice(string.digits) for _ in range(15 - len(prefix)))
    return body + luhn_check_digit(body)


def _when(rng: random.Random, max_days: int) -> dt.datetime:
    return _EPOCH - dt.timedelta(seconds=rng.randint(0, max_days * 86400))


def generate(
    seed: int = DEFAULT_SEED, *, customers: int = 1000, orders: int = 5000, keys: int = 300
) -> SampleData:
    """Generate the sample rows; the same arguments always give the same rows."""
    rng = random.Random(seed)
    out_customers: list[Customer] = []
    seen_emails: set[str] = set()
    for cid in range(1, customers + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        local = f"{first}.{last}".lower()
        email = f"{local}@{rng.choice(_MAIL_DOMAINS)}"
        if email in seen_emails:
            email = f"{local}{cid}@{rng.choice(_MAIL_DOMAINS)}"
        seen_emails.add(email)
        city, state, zip3 = rng.choice(_CITIES)
        address = (
            f"{rng.randint(1, 9899)} {rng.choice(_STREETS)}, {city}, {state} "
            f"{zip3}{rng.randint(0, 99):02d}"
        )
        # 555-01xx numbers are reserved for fiction, so they never reach a real person.
        phone = f"+1-{rng.randint(201, 989)}-555-01{rng.randint(0, 99):02d}"
        dob = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 55))
        out_customers.append(
            Customer(
                id=cid,
                full_name=f"{first} {last}",
                email=email,
                phone=phone,
                ssn=_ssn(rng),
                card_number=_card(rng),
                date_of_birth=dob,
                address=address,
                created_at=_when(rng, 5 * 365),
            )
        )
    out_keys = [
        ApiKey(
            id=kid,
            customer_id=rng.randint(1, customers),
            service=rng.choice(_SERVICES),
            key="sk_live_" + "".join(rng.choice(_KEY_ALPHABET) for _ in range(24)),
            created_at=_when(rng, 3 * 365),
        )
        for kid in range(1, keys + 1)
    ]
    out_orders = [
        Order(
            id=oid,
            customer_id=rng.randint(1, customers),
            amount=Decimal(rng.randint(199, 99999)) / 100,
            status=rng.choices(_STATUSES, weights=_STATUS_WEIGHTS)[0],
            created_at=_when(rng, 2 * 365),
        )
        for oid in range(1, orders + 1)
    ]
    return SampleData(customers=out_customers, api_keys=out_keys, orders=out_orders)
