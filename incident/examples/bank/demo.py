"""The Bank, end to end: what ``incident demo`` runs and narrates."""

from rich.console import Console
from rich.table import Table

from incident import Rejected

from . import build
from .messages import DepositMoney, OpenAccount, RequestTransfer, WithdrawMoney
from .projections import BankAccount, Transfer


def run(url: str, *, console: Console, run_id: str) -> None:
    """Open accounts, move money, try what the rules forbid, then show the read models.

    ``run_id`` keeps the account numbers of one run apart from earlier runs on the
    same file, so the demo can run again and again.
    """
    bank = build(url)
    alice, bob, ghost = f"ALICE-{run_id}", f"BOB-{run_id}", f"GHOST-{run_id}"
    console.rule(f"[bold]incident demo[/]: the Bank on {url}")

    def step(label: str, command: object) -> None:
        try:
            recorded = bank.dispatch(command)  # type: ignore[arg-type]
        except Rejected as rejected:
            console.print(f"  [red]✗[/] {label}: rejected ([bold]{rejected.reason}[/])")
            return
        kinds = ", ".join(r.event_type for r in recorded) or "nothing"
        console.print(f"  [green]✓[/] {label}: {kinds}")
        if isinstance(command, RequestTransfer):
            outcome = bank.projection_store.get(Transfer, command.aggregate_id)
            console.print(f"      the transfer process ran: {outcome.status if outcome else '?'}")

    console.print("[bold]Accounts[/]")
    step(f"open {alice}", OpenAccount(aggregate_id=alice))
    step(f"open {bob}", OpenAccount(aggregate_id=bob))
    step(f"open {alice} again", OpenAccount(aggregate_id=alice))
    step(f"deposit 100 to {alice}", DepositMoney(aggregate_id=alice, amount=100))
    step(f"withdraw 30 from {alice}", WithdrawMoney(aggregate_id=alice, amount=30))
    step(f"withdraw 500 from {alice}", WithdrawMoney(aggregate_id=alice, amount=500))
    step(f"deposit 5 to {ghost}", DepositMoney(aggregate_id=ghost, amount=5))

    console.print("[bold]Transfers[/]")
    transfers = [
        (f"T1-{run_id}", alice, bob, 40, "completes"),
        (f"T2-{run_id}", bob, alice, 1000, "source cannot pay: cancelled"),
        (f"T3-{run_id}", alice, ghost, 10, "destination missing: reverted"),
    ]
    for transfer_id, source, destination, amount, story in transfers:
        step(
            f"{transfer_id} {amount} {source} -> {destination} ({story})",
            RequestTransfer(
                aggregate_id=transfer_id,
                source_account_number=source,
                destination_account_number=destination,
                amount=amount,
            ),
        )

    accounts = Table(title="Balances (read model BankAccount)")
    for column in ("account", "balance", "version"):
        accounts.add_column(column)
    for number in (alice, bob):
        row = bank.projection_store.get(BankAccount, number)
        if row is not None:
            accounts.add_row(row.account_number, str(row.balance), str(row.version))
    console.print(accounts)

    table = Table(title="Transfers (read model Transfer)")
    for column in ("transfer", "from", "to", "amount", "status", "events"):
        table.add_column(column)
    for transfer_id, *_ in transfers:
        t = bank.projection_store.get(Transfer, transfer_id)
        if t is not None:
            table.add_row(
                t.aggregate_id,
                t.source_account_number,
                t.destination_account_number,
                str(t.amount),
                t.status,
                " → ".join(
                    r.event_type.removeprefix("Transfer") for r in bank.event_store.get(transfer_id)
                ),
            )
    console.print(table)
    total = sum(1 for _ in bank.event_store.read_all())
    console.print(f"{total} events in {url}. Show them: [bold]incident events {url}[/]")
    bank.event_store.close()
