/* The respawn wrapper's loop, in C: ~0.1 MB of memory a process, against ~12 MB
 * for a Python interpreter running the same loop (pipeline/respawn.py).
 *
 * Contract: pipeline/respawn.py does everything that needs the project's Python
 * (the configuration check and its one message per stack, joining the stack in
 * pipeline.stacklock) and then execs this program, which only keeps the child
 * running. It is built by scripts/install into build/respawn and used only when
 * build/respawn.sha256 names this source (else, or with USTACK_PURE=1,
 * pipeline/respawn.py runs the same loop itself: keep the two alike).
 *
 *   respawn NAME SUPERVISOR STARTED LOCK_FD RUN_DIR FORMAT -- COMMAND [ARGS...]
 *
 * NAME is honcho's process name; SUPERVISOR and STARTED the pid and start time
 * (clock ticks since boot) of the process supervising the stack (honcho,
 * systemd); LOCK_FD the open run directory holding this process's shared
 * flock on it (-1: none), RUN_DIR its path; FORMAT "json" or "console".
 *
 * What it does (pipeline/respawn.py says why): runs COMMAND, the child dying
 * with us (PR_SET_PDEATHSIG); passes SIGTERM and SIGINT on to it; restarts it
 * when it dies with exponential backoff (BACKOFF_*, reset after HEALTHY_AFTER
 * seconds of running), logging process_died; passes exit statuses 77
 * (EX_NOPERM) and 78 (EX_CONFIG) on as its own without a restart; exits 0 when
 * the child exits 0 or was stopped; stops the child and itself when the
 * supervisor is gone or its output pipe has no reader (supervisor_gone). On the
 * way out it leaves the stack: the last process out empties and removes the run
 * directory (pipeline.stacklock.StackLock.leave).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_FIRST 0.1  /* seconds before the first restart */
#define BACKOFF_MAX 5.0
#define HEALTHY_AFTER 30.0 /* a child that ran this long starts again from the first backoff */
#define WATCH_INTERVAL 0.5 /* seconds between looks at the supervisor */
#define STOP_GRACE 5.0     /* seconds a child gets to stop after SIGTERM before SIGKILL */
#define EX_NOPERM 77
#define EX_CONFIG 78
#define STACK_FILE "stack"

static const char *name;
static int console;
static sigset_t handled, saved_mask;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One log record on stdout, as pipeline.log renders it: JSON, or structlog's console line.
 * fields: "key", kind ('i' long, 'f' double, 's' string), value; ends with NULL. */
static void put_string(FILE *out, const char *s, int json) {
    fputc(json ? '"' : '\'', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '\\' || c == (json ? '"' : '\''))
            fprintf(out, "\\%c", c);
        else if (c < 0x20)
            fprintf(out, json ? "\\u%04x" : "\\x%02x", c);
        else
            fputc(c, out);
    }
    fputc(json ? '"' : '\'', out);
}

static void put_value(FILE *out, char kind, va_list *ap, int json) {
    if (kind == 'i')
        fprintf(out, "%ld", va_arg(*ap, long));
    else if (kind == 'f') {  /* as Python prints round(x, 3): no trailing zeros, at least one decimal */
        char text[64];
        int n = snprintf(text, sizeof text, "%.3f", va_arg(*ap, double));
        while (n > 2 && text[n - 1] == '0' && text[n - 2] != '.')
            text[--n] = '\0';
        fputs(text, out);
    }
    else
        put_string(out, va_arg(*ap, const char *), json);
}

static void warn(const char *event, ...) {
    char stamp[64];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof stamp - n, ".%06ldZ", ts.tv_nsec / 1000);
    va_list ap;
    const char *key;
    if (console) {  /* the layout of structlog's ConsoleRenderer without colours */
        printf("%s [warning  ] %-30s ", stamp, event);
        va_start(ap, event);
        while ((key = va_arg(ap, const char *)) != NULL) {
            char kind = (char)va_arg(ap, int);
            printf("%s=", key);
            put_value(stdout, kind, &ap, 0);
            putchar(' ');
        }
        va_end(ap);
        printf("proc=");
        put_string(stdout, name, 0);
        printf(" wrapper=respawn\n");
    } else {
        printf("{\"proc\": ");
        put_string(stdout, name, 1);
        printf(", \"wrapper\": \"respawn\"");
        va_start(ap, event);
        while ((key = va_arg(ap, const char *)) != NULL) {
            char kind = (char)va_arg(ap, int);
            printf(", \"%s\": ", key);
            put_value(stdout, kind, &ap, 1);
        }
        va_end(ap);
        printf(", \"event\": \"%s\", \"level\": \"warning\", \"timestamp\": \"%s\"}\n", event, stamp);
    }
    fflush(stdout);
}

/* The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or -1. */
static long long start_time(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');  /* comm may hold spaces */
    if (p == NULL)
        return -1;
    p += 2;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    return strtoll(p, NULL, 10);
}

/* Why the supervisor can no longer run the stack, or NULL while it can (stacklock.supervisor_gone). */
static const char *supervisor_gone(pid_t pid, long long started) {
    if (pid <= 1)
        return NULL;  /* init/systemd: outlives us */
    if (start_time(pid) != started)
        return "exited";
    char path[64], target[64];
    snprintf(path, sizeof path, "/proc/%d/fd/1", (int)pid);
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return NULL;  /* not a pipe we can look at (a tty, a file, /dev/null) */
    const char *why = NULL;
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n > 0) {
        target[n] = '\0';
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        /* A pipe's write end polls POLLERR once no reader is left. */
        if (strncmp(target, "pipe:", 5) == 0 && poll(&p, 1, 0) > 0 && (p.revents & POLLERR))
            why = "output_pipe_closed";
    }
    close(fd);
    return why;
}

/* Leave the stack (StackLock.leave): release our shared lock; the last process out removes
 * the stack's sockets and stack file, and the run directory if nothing else is in it. */
static void leave(int lock_fd, const char *run_dir) {
    if (lock_fd < 0)
        return;
    char parent[4096];  /* run_dir is absolute (pipeline/respawn.py passes it so) */
    snprintf(parent, sizeof parent, "%s", run_dir);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        slash[1] = '\0';
    else if (slash != NULL)
        *slash = '\0';
    int pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (pfd >= 0)
        flock(pfd, LOCK_EX);  /* as joiners and leavers take it */
    if (flock(lock_fd, LOCK_EX | LOCK_NB) == 0) {
        DIR *dir = opendir(run_dir);
        struct dirent *entry;
        while (dir != NULL && (entry = readdir(dir)) != NULL) {
            struct stat st;
            if (fstatat(dirfd(dir), entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue;
            if (S_ISSOCK(st.st_mode) || (S_ISREG(st.st_mode) && strcmp(entry->d_name, STACK_FILE) == 0))
                unlinkat(dirfd(dir), entry->d_name, 0);
        }
        if (dir != NULL)
            closedir(dir);
        close(lock_fd);
        rmdir(run_dir);  /* not if someone keeps other files there */
    } else {
        close(lock_fd);  /* others of this stack still run */
    }
    if (pfd >= 0)
        close(pfd);
}

/* Start the child; -1 if it could not be started (fork failed, or exec: said on stderr). */
static pid_t start_child(char **argv) {
    pid_t parent = getpid();
    int failed[2];  /* the child writes errno here if exec fails; exec closes it (as Python's subprocess) */
    if (pipe2(failed, O_CLOEXEC) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        /* The child dies with us, whatever kills us; signals as a fresh process has them. */
        prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
        if (getppid() != parent)
            _exit(1);
        signal(SIGPIPE, SIG_DFL);
        sigprocmask(SIG_SETMASK, &saved_mask, NULL);
        execvp(argv[0], argv);
        int err = errno;
        ssize_t unused = write(failed[1], &err, sizeof err);
        (void)unused;
        _exit(127);
    }
    close(failed[1]);
    int err = 0;
    ssize_t n = pid < 0 ? 0 : read(failed[0], &err, sizeof err);
    close(failed[0]);
    if (pid < 0) {
        fprintf(stderr, "%s: fork: %s\n", name, strerror(errno));
        return -1;
    }
    if (n == (ssize_t)sizeof err) {  /* a command that cannot run: restarting cannot help */
        waitpid(pid, NULL, 0);
        fprintf(stderr, "%s: cannot run %s: %s\n", name, argv[0], strerror(err));
        return -1;
    }
    return pid;
}

/* The child's status as pipeline/respawn.py sees it: the exit code, or minus the signal. */
static int decode(int status) {
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

/* Wait for one of our signals for at most `seconds`; 0 on timeout. */
static int next_signal(double seconds) {
    struct timespec ts = {.tv_sec = (time_t)seconds, .tv_nsec = (long)((seconds - (time_t)seconds) * 1e9)};
    int sig = sigtimedwait(&handled, NULL, &ts);
    return sig < 0 ? 0 : sig;
}

/* Reap the child if it exited: 1 and its status in *rc. */
static int reaped(pid_t child, int *rc) {
    int status;
    if (waitpid(child, &status, WNOHANG) == child) {
        *rc = decode(status);
        return 1;
    }
    return 0;
}

static int stop_child(pid_t child) {
    int rc;
    kill(child, SIGTERM);
    double deadline = now() + STOP_GRACE;
    for (double left; (left = deadline - now()) > 0;) {
        if (reaped(child, &rc))
            return rc;
        next_signal(left < 0.05 ? left : 0.05);
        if (reaped(child, &rc))
            return rc;
    }
    kill(child, SIGKILL);
    int status;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    return decode(status);
}

static char *joined(char **argv) {
    size_t size = 1;
    for (char **a = argv; *a; a++)
        size += strlen(*a) + 1;
    char *out = calloc(size, 1);
    if (out == NULL)
        return (char *)"";
    for (char **a = argv; *a; a++) {
        if (a != argv)
            strcat(out, " ");
        strcat(out, *a);
    }
    return out;
}

static int run(char **command, pid_t supervisor, long long supervisor_started) {
    double backoff = BACKOFF_FIRST;
    long restarts = 0;
    int stopping = 0;
    for (;;) {
        double started = now();
        pid_t child = start_child(command);
        if (child < 0)
            return 1;
        int rc = 0, exited = 0;
        while (!exited) {
            int sig = next_signal(WATCH_INTERVAL);
            if (sig == SIGTERM || sig == SIGINT) {
                stopping = 1;
                kill(child, sig);
            }
            exited = reaped(child, &rc);
            if (!exited && !stopping && sig == 0) {
                const char *why = supervisor_gone(supervisor, supervisor_started);
                if (why != NULL) {
                    warn("supervisor_gone", "supervisor", 'i', (long)supervisor, "why", 's', why, NULL);
                    stopping = 1;
                    rc = stop_child(child);
                    exited = 1;
                }
            }
        }
        if (rc == EX_CONFIG || rc == EX_NOPERM)
            return rc;
        if (stopping || rc == 0)
            return (rc == 0 || rc == -SIGTERM || rc == -SIGINT) ? 0 : rc & 0xff;
        double ran = now() - started;
        if (ran >= HEALTHY_AFTER)
            backoff = BACKOFF_FIRST;
        restarts++;
        static char *line;
        if (line == NULL)
            line = joined(command);
        warn("process_died", "exit_code", 'i', (long)rc, "ran_seconds", 'f', ran, "restart_in", 'f', backoff,
             "restarts", 'i', restarts, "command", 's', line, NULL);
        double deadline = now() + backoff;
        for (double left; !stopping && (left = deadline - now()) > 0;) {
            int sig = next_signal(left);
            if (sig == SIGTERM || sig == SIGINT)
                stopping = 1;
        }
        if (stopping)
            return 0;
        backoff = backoff * 2 < BACKOFF_MAX ? backoff * 2 : BACKOFF_MAX;
    }
}

int main(int argc, char **argv) {
    if (argc < 9 || strcmp(argv[7], "--") != 0) {
        fprintf(stderr, "usage: respawn NAME SUPERVISOR STARTED LOCK_FD RUN_DIR FORMAT -- COMMAND [ARGS...]\n"
                        "(run by pipeline/respawn.py, which checks the configuration and joins the stack first)\n");
        return 2;
    }
    name = argv[1];
    pid_t supervisor = (pid_t)atoi(argv[2]);
    long long supervisor_started = atoll(argv[3]);
    int lock_fd = atoi(argv[4]);
    const char *run_dir = argv[5];
    console = strcmp(argv[6], "console") == 0;
    if (lock_fd >= 0)
        fcntl(lock_fd, F_SETFD, FD_CLOEXEC);  /* the child holds no lock of ours */
    /* Our signals arrive through sigtimedwait, never as handlers; a reader gone is EPIPE, not death. */
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigprocmask(SIG_BLOCK, &handled, &saved_mask);
    signal(SIGPIPE, SIG_IGN);
    int rc = run(argv + 8, supervisor, supervisor_started);
    leave(lock_fd, run_dir);
    return rc;
}
