// The Verilator system model's harness: the device's byte streams on a TCP socket.
//
// Usage: Vnibble_device PORT   (PORT 0 picks a free one; the first stdout line is
// "listening on PORT"). One client at a time; the device keeps its state between clients,
// like a board between host programs. While the device is idle and no byte is waiting the
// harness sleeps in poll(), so an idle model costs no CPU; otherwise it clocks the model and
// services the socket every SERVICE cycles (of the design's clock; an SDRAM on a clock of its
// own is clocked between them). On SIGINT/SIGTERM it prints the clocked cycles and the rate
// to stderr.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "Vnibble_device.h"
#include "verilated.h"

static volatile sig_atomic_t stop = 0;
static void on_signal(int) { stop = 1; }

// Cycles between socket services while busy: short enough that a command queued behind a
// running GEMM arrives within a small tile's time, long enough that polling costs nothing.
static const int SERVICE = 256;

// The SDRAM's own clock, where the device has one (``sdram_hz``): the build defines the two
// half periods in a common time unit (SYNC_HALF 15, SDRAM_HALF 8: 48 and 90 MHz), and the
// SDRAM clock's edges up to a time are played before the design clock's edge at that time.
// Without them the SDRAM runs on the design's clock and there is nothing to play.
#ifndef SYNC_HALF
#define SYNC_HALF 1
#endif
#ifdef SDRAM_HALF
static unsigned long long sdram_next = SDRAM_HALF;  // the SDRAM clock's next edge
static void sdram_until(Vnibble_device *top, unsigned long long t) {
    while (sdram_next <= t) {
        top->sdram_clk = !top->sdram_clk;
        top->eval();
        sdram_next += SDRAM_HALF;
    }
}
#else
static void sdram_until(Vnibble_device *, unsigned long long) {}
#endif

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);

    int lsock = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lsock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    if (bind(lsock, (sockaddr *)&addr, sizeof addr) || listen(lsock, 1)) {
        perror("nibble sim: bind/listen");
        return 2;
    }
    socklen_t len = sizeof addr;
    getsockname(lsock, (sockaddr *)&addr, &len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    unsigned long long now = 0;  // time in units of the half periods below
    auto *ctx = new VerilatedContext;
    auto *top = new Vnibble_device{ctx};
    top->clk = 0;   // no reset: the registers start at their initial values
    top->eval();
    top->tx_ready = 1;

    std::vector<unsigned char> rx, tx;
    size_t rx_pos = 0;
    unsigned long long cycles = 0;
    double busy_seconds = 0;
    int client = -1;
    unsigned char buf[65536];

    while (!stop) {
        if (client < 0) {
            pollfd p{lsock, POLLIN, 0};
            if (poll(&p, 1, 200) <= 0) continue;
            client = accept(lsock, nullptr, nullptr);
            if (client < 0) continue;
            setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            rx.clear();
            rx_pos = 0;
            tx.clear();
        }
        // Service the socket: send what the device sent, take what the host sent. Block
        // only when the device has nothing to do.
        bool idle = top->idle && rx_pos == rx.size();
        if (!tx.empty()) {
            ssize_t n = send(client, tx.data(), tx.size(), MSG_DONTWAIT);
            if (n > 0) tx.erase(tx.begin(), tx.begin() + n);
        }
        pollfd p{client, POLLIN, 0};
        int ready = poll(&p, 1, idle && tx.empty() ? 200 : 0);
        if (ready > 0) {
            ssize_t n = recv(client, buf, sizeof buf, MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
                close(client);
                client = -1;
                continue;
            }
            if (n > 0) {
                if (rx_pos == rx.size()) {
                    rx.clear();
                    rx_pos = 0;
                }
                rx.insert(rx.end(), buf, buf + n);
            }
        }
        if (idle && rx_pos == rx.size() && tx.empty()) continue;

        auto t0 = std::chrono::steady_clock::now();
        for (int k = 0; k < SERVICE; k++) {
            bool have = rx_pos < rx.size();
            top->rx_valid = have;
            if (have) top->rx_data = rx[rx_pos];
            sdram_until(top, now);
            top->clk = 0;
            top->eval();
            bool take = have && top->rx_ready;
            bool give = top->tx_valid;
            unsigned char out = top->tx_data;
            sdram_until(top, now + SYNC_HALF);
            top->clk = 1;
            top->eval();
            now += 2 * SYNC_HALF;
            cycles++;
            if (take) rx_pos++;
            if (give) tx.push_back(out);
        }
        busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                            .count();
    }
    fprintf(stderr, "nibble sim: %llu cycles in %.3f s clocked (%.0f cycles/s)\n", cycles,
            busy_seconds, busy_seconds > 0 ? cycles / busy_seconds : 0.0);
    fprintf(stderr, "sdram flags 0x%x violations %u\n", (unsigned)top->sdram_flags,
            (unsigned)top->sdram_violations);
    top->final();
    delete top;
    delete ctx;
    return 0;
}
