"""The Batch API's owners, limits and strict bodies: a gateway without a model, jobs run by the
echo executor (both transports)."""

import contextlib
import json

import httpx
import pytest
from pydantic import SecretStr

from common.names import Names
from common.transport.connect import LocalHub, purge
from services.batch.api import batch_lifespan, batch_router
from services.batch.openai_batch import Limits
from services.gateway import ServedModel, create_app
from tests.batch.conftest import run_jobs

MODEL = "tiny-llama"
TIMEOUT_S = 30
KEY_A, KEY_B, KEY_ADMIN = "key-of-a", "key-of-b", "key-of-admin"


@pytest.fixture
def config(batch_config):
    return batch_config.model_copy(update={"model": MODEL})


@pytest.fixture
def keyed(config):
    """Two user keys (owners user-key-1, user-key-2) and an admin key."""
    return config.model_copy(update={"api_keys": SecretStr(f"{KEY_A},{KEY_B}"), "admin_keys": SecretStr(KEY_ADMIN)})


@contextlib.asynccontextmanager
async def gateway(config, **lifespan_args):
    """The gateway with the Batch API and no workers; ``run`` runs the queued jobs (echo)."""
    hub = LocalHub()
    app = create_app(
        config,
        ServedModel(MODEL, None, 2048),
        hub=hub,
        routers=(batch_router(),),
        lifespans=(batch_lifespan(run_consumer=False, **lifespan_args),),
    )
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield client, app
    finally:
        await purge(config, Names(config.namespace), hub)


def auth(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def jsonl(n, prefix="r"):
    return "".join(
        json.dumps(
            {
                "custom_id": f"{prefix}{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": MODEL, "prompt": f"words of line {i}", "max_tokens": 2},
            }
        )
        + "\n"
        for i in range(n)
    ).encode()


async def upload(client, content, key=None, **extra):
    return await client.post(
        "/v1/files",
        data={"purpose": "batch", **extra},
        headers=auth(key),
        files={"file": ("in.jsonl", content, "application/jsonl")},
    )


async def make_batch(client, key, lines=3, bad_line=False):
    content = jsonl(lines) + (b"{not json\n" if bad_line else b"")
    file = (await upload(client, content, key)).json()
    resp = await client.post(
        "/v1/batches", headers=auth(key), json={"input_file_id": file["id"], "endpoint": "/v1/completions"}
    )
    assert resp.status_code == 200, resp.text
    return file, resp.json()


def assert_not_found(resp):
    assert resp.status_code == 404, resp.text
    assert set(resp.json()["error"]) >= {"message", "type", "param", "code"}


async def test_owners_see_only_their_own_batches_and_files(keyed):
    async with gateway(keyed) as (client, app):
        file_a, batch_a = await make_batch(client, KEY_A, bad_line=True)
        _, batch_b = await make_batch(client, KEY_B)
        await run_jobs(app, 6, TIMEOUT_S)
        batch_a = (await client.get(f"/v1/batches/{batch_a['id']}", headers=auth(KEY_A))).json()
        assert batch_a["status"] == "completed", batch_a
        a_files = [file_a["id"], batch_a["output_file_id"], batch_a["error_file_id"]]
        # output and error file ids are random, not derived from the batch id
        assert all(f and batch_a["id"] not in f and batch_a["id"][6:] not in f for f in a_files[1:])
        assert len(set(a_files)) == 3

        # B: a 404 as for an id that does not exist, on every route
        nope = await client.get("/v1/batches/batch_0123456789abcdef01234567", headers=auth(KEY_B))
        assert_not_found(nope)
        for resp in [
            await client.get(f"/v1/batches/{batch_a['id']}", headers=auth(KEY_B)),
            await client.post(f"/v1/batches/{batch_a['id']}/cancel", headers=auth(KEY_B)),
            await client.post(
                "/v1/batches", headers=auth(KEY_B), json={"input_file_id": file_a["id"], "endpoint": "/v1/completions"}
            ),
            *[await client.get(f"/v1/files/{f}", headers=auth(KEY_B)) for f in a_files],
            *[await client.get(f"/v1/files/{f}/content", headers=auth(KEY_B)) for f in a_files],
        ]:
            assert_not_found(resp)
            assert resp.json()["error"]["type"] == nope.json()["error"]["type"]
        # ...and the old, guessable names of the output files do not exist
        for suffix in ("output", "errors"):
            assert_not_found(await client.get(f"/v1/files/file-{batch_a['id']}-{suffix}/content", headers=auth(KEY_A)))

        # A reads its own
        for f in a_files:
            assert (await client.get(f"/v1/files/{f}", headers=auth(KEY_A))).status_code == 200
        output = (await client.get(f"/v1/files/{batch_a['output_file_id']}/content", headers=auth(KEY_A))).text
        assert [json.loads(x)["custom_id"] for x in output.splitlines()] == ["r0", "r1", "r2"]

        # lists: each owner sees their own, the admin everyone's
        ids = {}
        for name, key in (("a", KEY_A), ("b", KEY_B), ("admin", KEY_ADMIN)):
            resp = await client.get("/v1/batches", headers=auth(key))
            assert resp.status_code == 200, resp.text
            ids[name] = [b["id"] for b in resp.json()["data"]]
        assert ids == {"a": [batch_a["id"]], "b": [batch_b["id"]], "admin": [batch_b["id"], batch_a["id"]]}

        # the admin sees, reads and cancels anyone's
        assert (await client.get(f"/v1/batches/{batch_a['id']}", headers=auth(KEY_ADMIN))).status_code == 200
        content = await client.get(f"/v1/files/{batch_a['output_file_id']}/content", headers=auth(KEY_ADMIN))
        assert content.text == output
        resp = await client.post(f"/v1/batches/{batch_b['id']}/cancel", headers=auth(KEY_ADMIN))
        assert resp.status_code == 200 and resp.json()["status"] == "completed"  # already finished

        # no key at all: 401 before any of this
        assert (await client.get("/v1/batches")).status_code == 401


async def test_owner_cancels_own_batch_not_others(keyed):
    async with gateway(keyed) as (client, _):
        _, batch = await make_batch(client, KEY_A)
        assert_not_found(await client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(KEY_B)))
        state = (await client.get(f"/v1/batches/{batch['id']}", headers=auth(KEY_A))).json()
        assert state["status"] == "in_progress" and state["cancelling_at"] is None
        resp = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(KEY_A))
        assert resp.status_code == 200 and resp.json()["status"] == "cancelling"


async def test_output_file_exists_only_once_the_batch_names_it(config):
    async with gateway(config) as (client, app):
        _, batch = await make_batch(client, None, lines=2)
        assert batch["output_file_id"] is None
        await run_jobs(app, 2, TIMEOUT_S)
        batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
        assert batch["output_file_id"] and batch["error_file_id"] is None
        obj = (await client.get(f"/v1/files/{batch['output_file_id']}")).json()
        assert obj["purpose"] == "batch_output" and obj["bytes"] > 0


async def test_without_keys_everything_belongs_to_one_anonymous_owner(config):
    async with gateway(config) as (client, app):
        file, batch = await make_batch(client, None, lines=2)
        await run_jobs(app, 2, TIMEOUT_S)
        listed = (await client.get("/v1/batches")).json()["data"]
        got = (await client.get(f"/v1/batches/{batch['id']}", headers=auth("any-key"))).json()
        output = await client.get(f"/v1/files/{got['output_file_id']}/content")
    assert [b["id"] for b in listed] == [batch["id"]]
    assert got["status"] == "completed" and output.status_code == 200


@pytest.mark.parametrize("size, status", [(1000, 200), (1001, 413)])
async def test_upload_size_limit(config, size, status):
    async with gateway(config, limits=Limits(max_file_bytes=1000)) as (client, _):
        resp = await upload(client, b"x" * size)
    assert resp.status_code == status, resp.text
    if status == 413:
        error = resp.json()["error"]
        assert error["code"] == "file_too_large" and error["param"] == "file"
        assert "1000 bytes" in error["message"]


class Body:
    """A multipart body sent in chunks; counts how many the server pulled."""

    def __init__(self, size, chunk=1000):
        boundary = "b0undary"
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        data = head + b"x" * size + f"\r\n--{boundary}--\r\n".encode()
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.length, self.pulled = len(data), 0

    async def stream(self):
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


async def test_oversized_upload_is_refused_while_streaming(config):
    limit = 100_000
    async with gateway(config, limits=Limits(max_file_bytes=limit)) as (client, _):
        # no Content-Length (chunked): refused once the count passes the limit
        body = Body(50 * limit)
        resp = await client.post("/v1/files", content=body.stream(), headers={"Content-Type": body.content_type})
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "file_too_large"
        assert body.pulled < len(body.chunks) / 10
        # a Content-Length over the limit: refused before the body is read
        body = Body(50 * limit)
        resp = await client.post(
            "/v1/files",
            content=body.stream(),
            headers={"Content-Type": body.content_type, "Content-Length": str(body.length)},
        )
        assert resp.status_code == 413 and body.pulled <= 1
        # the same body streamed within the limit is taken
        body = Body(limit)
        resp = await client.post("/v1/files", content=body.stream(), headers={"Content-Type": body.content_type})
        assert resp.status_code == 200, resp.text
        assert resp.json()["bytes"] == limit


@pytest.mark.parametrize("lines, status", [(5, 200), (6, 400)])
async def test_line_limit(config, lines, status):
    async with gateway(config, limits=Limits(max_lines=5)) as (client, _):
        resp = await upload(client, jsonl(lines) + b"\n\n")  # blank lines do not count
    assert resp.status_code == status, resp.text
    if status == 400:
        assert resp.json()["error"]["code"] == "too_many_lines"


def test_limits_from_the_environment(monkeypatch):
    assert Limits().max_file_bytes == 50 * 1024 * 1024 and Limits().max_lines == 50_000
    monkeypatch.setenv("EXEGPT_BATCH_MAX_FILE_BYTES", "12345")
    monkeypatch.setenv("EXEGPT_BATCH_MAX_LINES", "77")
    assert (Limits().max_file_bytes, Limits().max_lines) == (12345, 77)
    monkeypatch.setenv("EXEGPT_BATCH_MAX_LINES", "lots")
    with pytest.raises(ValueError, match="EXEGPT_BATCH_MAX_LINES"):
        Limits()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"endpoint": "/v1/completions", "model": MODEL}, "model"),
        ({"endpoint": "/v1/completions", "completion_window": "24h", "priority": 1}, "priority"),
    ],
)
async def test_unknown_fields_are_refused(config, body, param):
    async with gateway(config) as (client, _):
        file = (await upload(client, jsonl(1))).json()
        resp = await client.post("/v1/batches", json={"input_file_id": file["id"], **body})
        listed = (await client.get("/v1/batches")).json()["data"]
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == param
    assert param in error["message"]
    assert listed == []  # nothing was made


async def test_bad_bodies_and_forms(config):
    async with gateway(config) as (client, _):
        file = (await upload(client, jsonl(1))).json()
        extra = await upload(client, jsonl(1), expires_after="3600")
        no_file = await client.post("/v1/files", data={"purpose": "batch"})
        not_form = await client.post("/v1/files", json={"purpose": "batch"})
        meta = await client.post(
            "/v1/batches",
            json={
                "input_file_id": file["id"],
                "endpoint": "/v1/completions",
                "metadata": {f"k{i}": "v" for i in range(17)},
            },
        )
        typed = await client.post("/v1/batches", json={"input_file_id": 7, "endpoint": "/v1/completions"})
    assert extra.status_code == 400 and extra.json()["error"]["code"] == "unsupported_parameter"
    assert extra.json()["error"]["param"] == "expires_after"
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert not_form.status_code == 400
    assert meta.status_code == 400 and meta.json()["error"]["param"] == "metadata"
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "input_file_id"
