#!/usr/bin/env python3
"""A scriptable SMTP sink (it also counts EHLOs in DIR/connections) for Postern's delivery tests, on aiosmtpd.

Each accepted message is written to DIR as <n>.eml (the bytes received,
dot-unstuffed, CRLF kept) and <n>.json (mail_from, rcpt_tos). Recipients
matching --reject get 550 5.1.1; those matching --defer get 451 4.2.1 for
their first --defer-times attempts; --data-delay stalls the reply to the data
(--delay-file names a file whose number, when the file exists, replaces
--data-delay at each message, so a test can slow the sink down and speed it up).
--refuse-content refuses, after the data, messages whose bytes match it
(554 5.7.1), and --defer-content defers them (451 4.7.1): a content scanner.
The .json also records the client's EHLO name ("helo"), its IP address ("peer")
and the arrival time ("time", Unix seconds), so cluster tests can tell which
relay delivered what, when.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class Handler:
    def __init__(self, args):
        self.args = args
        self.count = 0
        self.connections = 0
        self.deferred = {}

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # Counts sessions (connections say EHLO once), for connection-reuse tests.
        self.connections += 1
        with open(os.path.join(self.args.dir, "connections"), "w") as f:
            f.write("%d\n" % self.connections)
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.args.reject and re.search(self.args.reject, address):
            return "550 5.1.1 <%s>: Recipient address rejected: no such user" % address
        if self.args.defer and re.search(self.args.defer, address):
            seen = self.deferred.get(address, 0)
            if seen < self.args.defer_times:
                self.deferred[address] = seen + 1
                return "451 4.2.1 <%s>: try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def data_delay(self):
        if self.args.delay_file:
            try:
                with open(self.args.delay_file) as f:
                    return float(f.read().strip() or 0)
            except FileNotFoundError:
                pass
        return self.args.data_delay

    async def handle_DATA(self, server, session, envelope):
        delay = self.data_delay()
        if delay:
            await asyncio.sleep(delay)
        content = envelope.original_content or b""
        if self.args.refuse_content and re.search(self.args.refuse_content.encode(), content):
            return "554 5.7.1 Message content refused by the scanner"
        if self.args.defer_content and re.search(self.args.defer_content.encode(), content):
            return "451 4.7.1 Scanner busy, try again later"
        self.count += 1
        base = os.path.join(self.args.dir, "%06d" % self.count)
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json", "w") as f:
            json.dump({"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                       "mail_options": envelope.mail_options,
                       "helo": session.host_name, "peer": session.peer[0] if session.peer else None,
                       "time": time.time()}, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 OK: queued as SINK%d" % self.count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--reject")
    parser.add_argument("--defer")
    parser.add_argument("--defer-times", type=int, default=1)
    parser.add_argument("--data-delay", type=float, default=0)
    parser.add_argument("--delay-file")
    parser.add_argument("--refuse-content")
    parser.add_argument("--defer-content")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    os.makedirs(args.dir, exist_ok=True)
    controller = Controller(Handler(args), hostname=host, port=int(port),
                            decode_data=False, enable_SMTPUTF8=True,
                            server_kwargs={"data_size_limit": 0})
    controller.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
    main()
