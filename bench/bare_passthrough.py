"""The floor for a Python proxy: an aiohttp pass-through that parses JSON both ways and does nothing else.

    python bench/bare_passthrough.py PORT UPSTREAM_BASE      (e.g. 8101 http://127.0.0.1:8100)
"""
import sys

from aiohttp import ClientSession, TCPConnector, web


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    up = await request.app["session"].post(request.app["upstream"] + request.path, json=body)
    if body.get("stream"):  # relay SSE bytes as they arrive
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        up.release()
        return resp
    data = await up.json(content_type=None)
    up.release()
    return web.json_response(data, status=up.status)


async def app_factory() -> web.Application:
    app = web.Application()
    app["upstream"] = sys.argv[2].rstrip("/")
    app["session"] = ClientSession(connector=TCPConnector(limit=0))  # no pool cap: streams are long-lived
    app.router.add_post("/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    web.run_app(app_factory(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
