#!/usr/bin/env python3
"""Opens N keep-alive connections to HOST:PORT, sends one GET on each, reads the answer and
keeps every connection open until stdin closes. Prints how many answered 200. Loopback only."""
import asyncio
import sys


async def one(host, port, sem, conns):
    async with sem:
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
        conns.append((r, w))
        return head.startswith(b"HTTP/1.1 200")


async def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if not host.startswith("127.") and host != "::1":
        sys.exit("loopback only")
    conns = []
    sem = asyncio.Semaphore(200)
    results = await asyncio.gather(
        *(asyncio.wait_for(one(host, port, sem, conns), 20) for _ in range(n)),
        return_exceptions=True,
    )
    ok = sum(1 for r in results if r is True)
    print(f"opened {len(conns)} answered_200 {ok}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for _, w in conns:
        w.close()


asyncio.run(main())
