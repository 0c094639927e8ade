"""The demo's sample data is deterministic, well-formed and the advertised size."""

from __future__ import annotations

import re

from dbward.demo import sample_data
from dbward.demo.sample_data import generate, luhn_check_digit, luhn_valid


def test_deterministic() -> None:
    assert generate(seed=7) == generate(seed=7)
    assert generate(seed=7).customers != generate(seed=8).customers


def test_row_counts_and_ids() -> None:
    data = generate()
    assert len(data.customers) == 1000
    assert len(data.orders) == 5000
    assert len(data.api_keys) > 0
    assert [c.id for c in data.customers] == list(range(1, 1001))
    ids = {c.id for c in data.customers}
    assert all(o.customer_id in ids for o in data.orders)
    assert all(k.customer_id in ids for k in data.api_keys)


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("41111111111111a1")
    assert luhn_check_digit("7992739871") == "3"


def test_cards_are_16_digit_luhn_valid() -> None:
    for c in generate().customers:
        assert len(c.card_number) == 16 and c.card_number.isdigit()
        assert luhn_valid(c.card_number), c.card_number


def test_ssn_phone_email_format() -> None:
    data = generate()
    for c in data.customers:
        assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", c.ssn)
        area, group, serial = c.ssn.split("-")
        assert area not in ("000", "666") and not area.startswith("9")
        assert group != "00" and serial != "0000"
        assert re.fullmatch(r"\+1-\d{3}-555-01\d{2}", c.phone)
        assert re.fullmatch(r"[a-z.]+\d*@[a-z.]+", c.email)
    assert len({c.email for c in data.customers}) == len(data.customers)


def test_api_keys_and_orders() -> None:
    data = generate()
    for k in data.api_keys:
        assert re.fullmatch(r"sk_live_[A-Za-z0-9]{24}", k.key)
    assert len({k.key for k in data.api_keys}) == len(data.api_keys)
    for o in data.orders:
        assert o.amount == o.amount.quantize(o.amount.__class__("0.01"))
        assert 0 < o.amount < 100_000_000
        assert o.status in {"pending", "paid", "shipped", "delivered", "refunded", "cancelled"}


def test_rows_match_columns() -> None:
    data = generate(customers=3, orders=3, keys=3)
    assert len(data.customers[0].row()) == len(sample_data.CUSTOMER_COLUMNS)
    assert len(data.api_keys[0].row()) == len(sample_data.API_KEY_COLUMNS)
    assert len(data.orders[0].row()) == len(sample_data.ORDER_COLUMNS)
    for col in sample_data.CUSTOMER_COLUMNS:
        assert col in sample_data.SCHEMA_SQL
