/* Deterministic getrandom for benchmarks: LuaJIT seeds its PRNG (string hashes, trace penalties) with
   syscall(SYS_getrandom); this answers it with a fixed byte sequence. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <dlfcn.h>

static unsigned long long state = 0x9E3779B97F4A7C15ULL;

static long fill(unsigned char *buf, size_t len) {
    for (size_t i = 0; i < len; i++) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        buf[i] = (unsigned char)(state >> 56);
    }
    return (long)len;
}

long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long a1 = va_arg(ap, long), a2 = va_arg(ap, long), a3 = va_arg(ap, long);
    long a4 = va_arg(ap, long), a5 = va_arg(ap, long), a6 = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_getrandom) {
        return fill((unsigned char *)a1, (size_t)a2);
    }
    static long (*real)(long, ...) = NULL;
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(number, a1, a2, a3, a4, a5, a6);
}

ssize_t getrandom(void *buf, size_t len, unsigned int flags) {
    (void)flags;
    return fill((unsigned char *)buf, len);
}

int getentropy(void *buf, size_t len) {
    fill((unsigned char *)buf, len);
    return 0;
}
