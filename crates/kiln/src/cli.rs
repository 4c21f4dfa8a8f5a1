//! Command-line flags. Raw flags live here; `cmd` turns them into calls.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a self-hosted internal developer platform",
    propagate_version = true
)]
pub struct Cli {
    /// The organization to work in.
    #[arg(long, global = true, env = "KILN_ORG")]
    pub org: Option<String>,
    /// The server's URL (default: from `kiln login`, else http://127.0.0.1:7080).
    #[arg(
        long,
        alias = "server",
        global = true,
        env = "KILN_URL",
        hide_env_values = true
    )]
    pub url: Option<String>,
    /// An API token (default: from `kiln login`).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Kiln server (API, console, controllers).
    Server(ServerArgs),
    /// Store a server URL and token in the user's config directory.
    Login(LoginArgs),
    /// Create or update objects from manifests.
    Apply(ApplyArgs),
    /// List objects, or show one.
    Get(GetArgs),
    /// Show one object in detail: spec, conditions, recent events.
    Describe(DescribeArgs),
    /// Delete an object, or the objects a manifest names.
    Delete(DeleteArgs),
    /// Promote the release running in one environment to the next one on the project's pipeline.
    Promote {
        component: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, short = 'p')]
        project: Option<String>,
    },
    /// Approve a promotion waiting for approval (`COMPONENT --env ENV`), or an approval step of a pipeline run
    /// (`PIPELINE/NUMBER [--step STEP] [--reject]`).
    Approve {
        /// A component, or a run as `PIPELINE/NUMBER`.
        target: String,
        /// The environment whose promotion to approve (components).
        #[arg(long = "env")]
        environment: Option<String>,
        #[arg(long, short = 'p')]
        project: Option<String>,
        /// The run's approval step (default: the one that waits).
        #[arg(long)]
        step: Option<String>,
        /// Reject the step instead: it fails.
        #[arg(long)]
        reject: bool,
    },
    /// Point an environment back at the previous release (or the one given).
    Rollback {
        component: String,
        #[arg(long = "env")]
        environment: String,
        /// The release to go back to.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, short = 'p')]
        project: Option<String>,
    },
    /// A component's releases and what runs in each environment.
    Releases {
        component: String,
        #[arg(long, short = 'p')]
        project: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Logs of a component's replicas in one environment, `[r<replica>] <line>` each.
    Logs(LogsArgs),
    /// Scheduled tasks: start a run now (besides the schedule). Runs are listed in the binding's status
    /// (`kiln get releasebinding <component>-<env> -o yaml`); `kiln logs --run N` prints one.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Templates of workspaces.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Remote development workspaces.
    #[command(subcommand, alias = "ws")]
    Workspace(WorkspaceCommand),
    /// Provisioners: run one on this host (`start`), list the live ones, manage provisioner keys.
    #[command(subcommand)]
    Provisioner(ProvisionerCommand),
    /// CI pipelines: start a run, follow or cancel it (pipelines themselves are applied with `kiln apply`).
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Run a pipeline runner on this host (with no subcommand), list the live runners, manage runner tokens.
    Runner(RunnerArgs),
    /// Files a run's steps saved as artifacts.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// The runs of a pipeline (or of every pipeline), newest first, with each step's status.
    Runs {
        /// Only this pipeline's runs.
        pipeline: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Forward local TCP ports to ports inside a workspace, through the server.
    PortForward(PortForwardArgs),
    /// A shell or a command in a workspace over SSH, through the server.
    Ssh(SshArgs),
    /// Write `Host kiln.<workspace>` entries for your workspaces into ~/.ssh/config, so plain `ssh`, `scp`,
    /// `rsync` and editors' remote modes reach them.
    ConfigSsh(ConfigSshArgs),
    /// Run a workspace agent (started by provisioners inside each workspace; reads KILN_AGENT_URL and
    /// KILN_AGENT_TOKEN).
    #[command(hide = true)]
    Agent {
        #[arg(long, env = "KILN_AGENT_URL")]
        url: String,
        #[arg(long, env = "KILN_AGENT_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// The laptop daemon: tunnel to environments, split DNS, serves (`run` in the foreground, or `install`
    /// it as a system service run by `kiln supervisor`).
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Run the daemon and keep it running: restart it with backoff when it dies, and undo its system changes
    /// (resolver configuration, hosts entries) after a crash and on exit.
    Supervisor(DaemonArgs),
    /// Wire this laptop into an environment: its components answer at `<component>.<project>.<env>.kiln`
    /// (`kiln connect PROJECT/ENV`), or see who is connected (`kiln connect status`).
    Connect(ConnectArgs),
    /// Leave an environment (or, with none named, every one).
    Disconnect {
        /// PROJECT/ENV.
        environment: Option<String>,
    },
    /// Route an environment's traffic for a component to a port on this laptop: requests carrying your header
    /// (default `kiln-serve: <you>`), the given header, or with --all every request.
    Serve(ServeArgs),
    /// Organizations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Users.
    #[command(subcommand)]
    User(UserCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Who the current credentials belong to, and their roles.
    Whoami,
    /// The audit log of mutating requests.
    Audit(AuditArgs),
    /// Client and server versions.
    Version,
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7080", env = "KILN_LISTEN")]
    pub listen: SocketAddr,
    /// Where the embedded database, the admin token and other state live.
    #[arg(long, default_value = ".kiln", env = "KILN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Use PostgreSQL instead of the embedded SQLite database (postgres://user:pass@host/db).
    #[arg(long, env = "KILN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Public endpoints are served at <endpoint>--<component>--<project>--<env>.<BASE_DOMAIN>.
    #[arg(long, default_value = "localhost", env = "KILN_BASE_DOMAIN")]
    pub base_domain: String,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// For benchmarks only: serve `process` and `docker` DataPlanes with a no-op driver that runs nothing and
    /// reports every replica ready.
    #[arg(long, hide = true)]
    pub noop_data_planes: bool,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The server's URL, e.g. http://127.0.0.1:7080.
    pub server_url: String,
    /// An API token to store (`--token T` works as well); without one, log in with a username and password.
    #[arg(long = "with-token")]
    pub with_token: Option<String>,
    #[arg(long, short = 'u')]
    pub username: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A manifest file, a directory of them, or `-` for standard input. Repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Project for project-scoped objects whose manifest names none.
    #[arg(long, short = 'p')]
    pub project: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Wide,
    Json,
    Yaml,
    Name,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list: a kind, its plural or a short name (components, comp, envs, ...).
    pub kind: String,
    pub name: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Label selector, e.g. `app=web,tier!=db`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Project (for project-scoped kinds; default: all projects).
    #[arg(long, short = 'p')]
    pub project: Option<String>,
    /// After listing, follow changes.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    pub kind: String,
    pub name: String,
    #[arg(long, short = 'p')]
    pub project: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub kind: Option<String>,
    pub name: Option<String>,
    /// Delete what these manifests name.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<String>,
    #[arg(long, short = 'p')]
    pub project: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organization (superusers only); you become its owner.
    Create {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    /// List the organizations you can see.
    List,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user bound to a role in an organization. Prints a generated password unless one is given.
    Create {
        name: String,
        /// Role to bind: owner, admin, developer, viewer, or a Role of the organization.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Limit the binding to one project.
        #[arg(long, short = 'p')]
        project: Option<String>,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users you can see.
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token and print it (it is shown only once).
    Create {
        /// For another user (yourself by default).
        #[arg(long)]
        user: Option<String>,
        /// Lifetime: 30d, 12h, 90m ...; no expiry by default.
        #[arg(long)]
        expires: Option<String>,
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List API tokens.
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke an API token by id.
    Revoke { id: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub kind: Option<String>,
    /// RFC 3339 time, or a duration ago such as 2h.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Ask for a run of a scheduled task now; it follows the task's concurrency policy like a scheduled one.
    Run {
        component: String,
        /// The environment.
        #[arg(long = "env")]
        environment: String,
        #[arg(long, short = 'p')]
        project: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The component; or `run`, followed by a pipeline run (`kiln logs run shop-ci/42 -f`).
    pub component: String,
    /// With `run`: the run, `PIPELINE/NUMBER` or its name.
    pub run_name: Option<String>,
    /// The environment (a component's logs).
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Keep streaming new lines until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only this replica (its index).
    #[arg(long)]
    pub replica: Option<u32>,
    /// Only lines since a time (RFC 3339) or for a duration back from now (10m, 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many past lines per replica.
    #[arg(long)]
    pub tail: Option<usize>,
    /// The output of this run of a scheduled task (its number, as `status.runs` lists it).
    #[arg(long)]
    pub run: Option<u64>,
    /// Prefix each line with the time it was written.
    #[arg(long)]
    pub timestamps: bool,
    #[arg(long, short = 'p')]
    pub project: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Create or update a template from a directory: `template.yaml` (a Template manifest) and the
    /// directory's other files, which the template carries (e.g. Terraform configuration). A manifest file
    /// instead of a directory makes a template without files.
    Push {
        dir: PathBuf,
        /// The template's name (default: the manifest's, else the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Start a run now, on a branch (default: the pipeline's) or a commit, with parameters.
    Run {
        pipeline: String,
        #[arg(long)]
        branch: Option<String>,
        #[arg(long)]
        commit: Option<String>,
        /// A parameter value, NAME=VALUE (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Follow the run's log until it ends; exit non-zero unless it succeeded.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// A run's log: `PIPELINE/NUMBER` or the run's name (`PIPELINE-NUMBER`).
    Logs {
        run: String,
        /// Keep streaming new lines until the run ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Cancel a run: `PIPELINE/NUMBER` or the run's name.
    Cancel { run: String },
    /// Run again what a run ran: the same pipeline snapshot, commit and parameters, as a new run.
    Rerun {
        run: String,
        /// Follow the new run's log until it ends; exit non-zero unless it succeeded.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// A pipeline's triggers: webhook URLs to give the Git host or registry, cron schedules with their next
    /// time, poll state, and the last run each started.
    Triggers { pipeline: String },
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RunnerArgs {
    #[command(subcommand)]
    pub command: Option<RunnerCommand>,
    /// The runner token (`kiln runner tokens create`).
    #[arg(long, env = "KILN_RUNNER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Labels pipelines can ask for (`runnerLabels`), comma-separated `KEY=VALUE`; a bare `KEY` means
    /// `KEY=true`.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Its name among the live runners (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Runs at once.
    #[arg(long, default_value_t = 2)]
    pub capacity: usize,
    /// Steps of one run at once.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Where runs are checked out and caches kept.
    #[arg(long, env = "KILN_RUNNER_DIR")]
    pub dir: Option<PathBuf>,
    /// Run no container steps even when a Docker Engine answers.
    #[arg(long)]
    pub no_docker: bool,
}

#[derive(Debug, Subcommand)]
pub enum RunnerCommand {
    /// The runners that asked for this organization's runs lately, built-in and external.
    List,
    /// Runner tokens (organization administrators).
    #[command(subcommand)]
    Tokens(RunnerTokensCommand),
}

#[derive(Debug, Subcommand)]
pub enum RunnerTokensCommand {
    /// Create a token; it is printed once.
    Create {
        name: String,
    },
    List,
    /// Delete a token: runners using it are refused from their next request.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// The artifact files of a run (`PIPELINE/NUMBER`).
    List { run: String },
    /// Download one artifact file of a run.
    Get {
        run: String,
        path: String,
        /// Where to write it (default: its file name in the current directory; `-` for standard output).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProvisionerCommand {
    /// Run a provisioner on this host: it takes the organization's workspace builds whose templates ask for
    /// the key's tags, and runs them with the providers this host has (process; docker when an Engine answers;
    /// terraform when the binary runs). Stops on Ctrl-C or SIGTERM after the builds under way.
    Start {
        /// The provisioner key (`kiln provisioner keys create`).
        #[arg(long, env = "KILN_PROVISIONER_KEY", hide_env_values = true)]
        key: String,
        /// Its name among the live provisioners (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Where process and terraform workspaces live on this host.
        #[arg(long, env = "KILN_PROVISIONER_DIR")]
        dir: Option<PathBuf>,
        /// Offer only these provider types (comma-separated: process, docker, terraform).
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Builds run at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
    /// The provisioners that asked for this organization's jobs lately, built-in and external.
    List,
    /// Provisioner keys (organization administrators).
    #[command(subcommand)]
    Keys(ProvisionerKeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum ProvisionerKeysCommand {
    /// Create a key; it is printed once. Its provisioners take the jobs of templates whose
    /// `provisionerTags` are all among its tags.
    Create {
        name: String,
        /// A tag, KEY=VALUE (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// List the keys (names, tags, who created them); secrets are never shown again.
    List,
    /// Delete a key: provisioners using it are refused from their next request.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace from a template and start it.
    Create {
        name: String,
        #[arg(long, short = 't')]
        template: String,
        /// A parameter value, NAME=VALUE (repeatable).
        #[arg(long = "parameter", short = 'p')]
        parameters: Vec<String>,
        /// Stop it after this long without activity, e.g. 8h.
        #[arg(long)]
        ttl: Option<String>,
        /// Create it stopped.
        #[arg(long)]
        stopped: bool,
        /// Return at once instead of waiting until its agent is ready.
        #[arg(long)]
        no_wait: bool,
    },
    /// List workspaces: state, agent, template version.
    List,
    /// Start a stopped (or failed) workspace.
    Start {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a workspace: its process or container goes, its home stays.
    Stop {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a workspace and everything its builds made.
    Delete { name: String },
    /// The workspace's apps: share level, health and the URL to open each at.
    Apps { name: String },
    /// Build and agent (startup script) logs.
    Logs {
        name: String,
        /// Keep streaming new lines.
        #[arg(long, short = 'f')]
        follow: bool,
        /// A build other than the latest.
        #[arg(long)]
        build: Option<u32>,
    },
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The workspace (`kiln.<name>` also works).
    pub workspace: String,
    /// Relay the SSH connection on standard input and output (for OpenSSH's ProxyCommand).
    #[arg(long, conflicts_with_all = ["tty", "env", "command"])]
    pub stdio: bool,
    /// Allocate a terminal even for a command.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set a variable in the remote environment, KEY=VALUE (repeatable).
    #[arg(short = 'e', long, value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command to run instead of a login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct ConfigSshArgs {
    /// The OpenSSH client configuration to update.
    #[arg(long, default_value_os_t = default_ssh_config())]
    pub ssh_config: PathBuf,
    /// Print the block instead of writing it.
    #[arg(long)]
    pub dry_run: bool,
}

fn default_ssh_config() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".ssh")
        .join("config")
}

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// The workspace.
    pub workspace: String,
    /// LOCAL:REMOTE, or a range LOW-HIGH:LOW-HIGH, or one PORT for both (repeatable).
    #[arg(long, required = true)]
    pub tcp: Vec<String>,
    /// The local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: std::net::IpAddr,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Run the daemon in the foreground.
    Run(DaemonArgs),
    /// Install the daemon as a systemd service (`kiln supervisor` with these flags), enable and start it.
    Install {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Where the unit goes.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
        /// Write the unit only; do not ask systemd to start it.
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and remove the service `install` made.
    Uninstall {
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
    },
}

/// How a daemon runs (also what `kiln supervisor` passes to the daemon it runs).
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// The control socket (default: /run/kiln/daemon.sock for root, else under $XDG_RUNTIME_DIR).
    #[arg(long, env = "KILN_DAEMON_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Where the daemon keeps its state and its journal of system changes.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The user (uid) allowed on the socket besides root (default: $SUDO_UID, else the daemon's own).
    #[arg(long)]
    pub owner: Option<u32>,
    /// Where the DNS server listens.
    #[arg(long, default_value = "127.77.0.1:53")]
    pub dns: SocketAddr,
    /// split: the daemon's DNS server becomes the first resolver; hosts: a marked block in the hosts file;
    /// off: no system change.
    #[arg(long, default_value = "split")]
    pub dns_mode: connect::system::Mode,
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    #[arg(long, default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,
    /// Resolvers for every other name (default: those of the resolver configuration).
    #[arg(long, value_delimiter = ',')]
    pub upstream: Vec<SocketAddr>,
    /// The names' suffix.
    #[arg(long, default_value = "kiln")]
    pub suffix: String,
    /// Service addresses come from this /16.
    #[arg(long, default_value = "127.77.0.0")]
    pub addresses: std::net::Ipv4Addr,
    /// This machine's name, as others see it (default: the host name).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConnectArgs {
    /// PROJECT/ENV.
    pub environment: Option<String>,
    #[command(subcommand)]
    pub command: Option<ConnectCommand>,
}

#[derive(Debug, Subcommand)]
pub enum ConnectCommand {
    /// This laptop's connections and names, and who else is connected to them and what they serve.
    Status {
        /// Keep showing changes.
        #[arg(long, short = 'w')]
        watch: bool,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    pub component: String,
    /// The local port requests go to.
    #[arg(long, required_unless_present = "stop")]
    pub port: Option<u16>,
    /// The endpoint (default: the component's only one).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Only requests with this header: NAME=VALUE.
    #[arg(long, conflicts_with = "all")]
    pub header: Option<String>,
    /// Every request of the component in the environment.
    #[arg(long)]
    pub all: bool,
    /// PROJECT/ENV (default: the environment connected last).
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// End the serve instead.
    #[arg(long)]
    pub stop: bool,
}
