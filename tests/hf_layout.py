"""Model folders in Hugging Face's layout written by transformers itself (save_pretrained), with random weights and
the real GPT-2 vocabulary, and a loopback Hugging Face Hub that serves them to huggingface_hub."""
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import urllib.parse


from tests.release_layout import real_vocab_file

SHAPE = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)


def randomize(model, seed):
    """Every weight random, layer norm gains around 1 and biases included, so a loader that swapped or dropped
    one is caught (transformers initializes biases to 0 and gains to 1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("weight") and p.ndim == 1:  # a layer norm's gain
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:  # std 1/sqrt(n_in) keeps each block's output the size of its input; embeddings 0.02 as GPT-2
                fan_in = p.shape[0] if "wte" not in name and "wpe" not in name else 2500
                p.copy_(noise / fan_in ** 0.5)
    return model


def copy_vocab(folder):
    shutil.copyfile(real_vocab_file("encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copyfile(real_vocab_file("vocab.bpe"), os.path.join(folder, "merges.txt"))


def write_hf_folder(folder, dtype="float32", base=False, seed=0, **config):
    """save_pretrained of a random GPT2LMHeadModel (GPT2Model if base: no `transformer.` prefix, no head) in
    `dtype`, plus vocab.json and merges.txt. Returns the float32 GPT2LMHeadModel those weights make."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(seed)
    hf_config = GPT2Config(**{**SHAPE, **config})
    model = randomize((GPT2Model if base else GPT2LMHeadModel)(hf_config).eval(), seed)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    copy_vocab(folder)
    return GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# --- A loopback Hub --------------------------------------------------------------------------------------------

class HubServer(http.server.ThreadingHTTPServer):
    """Answers what huggingface_hub asks of the Hub for a download, for the repos in `repos`:
    {repo_id: {"sha": commit, "files": {path: bytes}, "token": None or the token it requires}}.
      GET  /api/models/{repo}/revision/{rev}     JSON {id, sha, siblings}
      GET  /api/models/{repo}/tree/{rev}         JSON [{type, path, size, oid}] (recursive)
      HEAD /{repo}/resolve/{rev}/{path}          ETag, X-Repo-Commit, Content-Length
      GET  /{repo}/resolve/{rev}/{path}          the bytes, or from a Range's start (206)
    A repo it does not hold (or one asked for without its token) is a 404 with X-Error-Code RepoNotFound, as the
    Hub answers. `requests` records (method, path) of every request, `ranges` the Range header of each GET of a
    file. cuts[path] = n drops the connection 1000 bytes before the end of the next n whole-file answers for path."""

    daemon_threads = True

    def __init__(self, repos):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos, self.requests, self.ranges, self.cuts = repos, [], [], {}

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"

    def files_fetched(self, repo):
        prefix = f"/{repo}/resolve/"
        return sorted({path.split("/", 1)[1] for method, full in self.requests if method == "GET"
                       and full.startswith(prefix) for path in [full[len(prefix):]]})


def repo_from_folder(folder, sha="0123456789abcdef0123456789abcdef01234567", **extra):
    files = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    return {"sha": sha, "files": files, "token": None, **extra}


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=(), head=False):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def not_found(self, code, head=False):
        self.answer(404, json.dumps({"error": code}).encode(), [("X-Error-Code", code),
                                                                ("Content-Type", "application/json")], head)

    def repo(self, repo_id):
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo["token"] and self.headers.get("Authorization") != f"Bearer {repo['token']}"):
            return None
        return repo

    def route(self, head):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.requests.append(("HEAD" if head else "GET", path))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = api or resolve
        if not match:
            return self.not_found("RepoNotFound", head)
        repo = self.repo(match.group(1))
        if repo is None:
            return self.not_found("RepoNotFound", head)
        revision = match.group(3) if api else match.group(2)
        if revision not in ("main", repo["sha"]):
            return self.not_found("RevisionNotFound", head)
        files = repo["files"]
        if api and api.group(2) == "revision":
            info = {"id": match.group(1), "modelId": match.group(1), "sha": repo["sha"], "private": False,
                    "siblings": [{"rfilename": name} for name in files]}
            return self.answer(200, json.dumps(info).encode(), [("Content-Type", "application/json")], head)
        if api:
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return self.answer(200, json.dumps(tree).encode(), [("Content-Type", "application/json")], head)
        name = resolve.group(3)
        if name not in files:
            return self.not_found("EntryNotFound", head)
        data, start = files[name], 0
        if not head:
            self.server.ranges.append((name, self.headers.get("Range")))
        headers = [("ETag", f'"{hashlib.sha256(data).hexdigest()}"'), ("X-Repo-Commit", repo["sha"]),
                   ("Accept-Ranges", "bytes")]
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if ranged and not head:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"))
            return self.answer(206, data[start:end], headers)
        if not head and self.server.cuts.get(name):
            self.server.cuts[name] -= 1
            self.send_response(200)
            for key, value in [*headers, ("Content-Length", str(len(data)))]:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[:-1000])
            self.wfile.flush()
            self.close_connection = True
            return
        self.answer(200, data, headers, head)

    def do_GET(self):
        self.route(head=False)

    def do_HEAD(self):
        self.route(head=True)


def serve_hub(repos):
    """A started HubServer; call .shutdown() and .server_close() when done."""
    server = HubServer(repos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
