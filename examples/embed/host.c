/*
** host.c: an example of a host that embeds Lua 5.4 and lpar as a game
** would: a render thread of its own, and a frame loop that never blocks.
**
**   lpar_embed frame.lua
**
** The script returns a table with start(), frame(n) and finish(). start()
** runs before the render thread exists, so the pool's workers are forked
** from a single-threaded process; it returns the fd the frame loop waits
** on between frames. frame(n) runs once per frame and returns true when
** the script is done; finish() returns a report and whether all went well.
*/
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lauxlib.h"
#include "lpar.h"
#include "lualib.h"

/* frame budget: the loop waits at most this long between frames (ms) */
#define FRAMEMS 4

/* give up after this many frames (a script that never finishes) */
#define MAXFRAMES 20000

/* What the render thread shares with the main thread. */
typedef struct Render {
  pthread_t thread;
  pthread_mutex_t lock; /* held while "drawing" */
  atomic_int stop;
  atomic_long ticks;  /* frames drawn */
  double scene[4096]; /* what it draws, under 'lock' */
} Render;

static Render render = {.lock = PTHREAD_MUTEX_INITIALIZER};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The render thread: draws (some arithmetic under a lock) every ms. */
static void *renderloop(void *arg) {
  Render *r = arg;
  struct timespec ms = {0, 1000000};
  while (!atomic_load(&r->stop)) {
    size_t i;
    pthread_mutex_lock(&r->lock);
    for (i = 0; i < sizeof r->scene / sizeof r->scene[0]; i++)
      r->scene[i] = r->scene[i] * 0.5 + (double)i;
    pthread_mutex_unlock(&r->lock);
    atomic_fetch_add(&r->ticks, 1);
    nanosleep(&ms, NULL);
  }
  return NULL;
}

/* host.ticks() -> frames the render thread has drawn. Lock-free, so it
   is safe anywhere, even in a forked worker (where it reads the copy). */
static int l_ticks(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)atomic_load(&render.ticks));
  return 1;
}

/* host.now() -> seconds on the monotonic clock. */
static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)now());
  return 1;
}

/*
** host.scene(i) -> a value of the render thread's scene. It takes the
** render lock, which the render thread may have held at the moment a
** worker was forked: in a worker it would wait forever on a lock whose
** owner does not exist there. So it refuses to run in a worker.
*/
static int l_scene(lua_State *L) {
  lua_Integer i = luaL_checkinteger(L, 1);
  double v;
  if (lpar_inworker(L))
    return luaL_error(L, "host.scene: not available in an lpar worker");
  luaL_argcheck(L, i >= 1 && i <= 4096, 1, "out of range");
  pthread_mutex_lock(&render.lock);
  v = render.scene[i - 1];
  pthread_mutex_unlock(&render.lock);
  lua_pushnumber(L, (lua_Number)v);
  return 1;
}

static const luaL_Reg hostfuncs[] = {
    {"ticks", l_ticks}, {"now", l_now}, {"scene", l_scene}, {NULL, NULL}};

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL)
    msg =
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Call field 'name' of the script table at index 1 with 'nargs' arguments
   on the stack; leaves one result. Returns 0, or 1 after printing. */
static int call(lua_State *L, const char *name, int nargs) {
  int base;
  lua_getfield(L, 1, name);
  lua_insert(L, -1 - nargs);
  base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, msghandler);
  lua_insert(L, base);
  if (lua_pcall(L, nargs, 1, base) != LUA_OK) {
    fprintf(stderr, "lpar_embed: %s: %s\n", name, lua_tostring(L, -1));
    return 1;
  }
  lua_remove(L, base);
  return 0;
}

int main(int argc, char **argv) {
  const char *script = argc > 1 ? argv[1] : "frame.lua";
  lua_State *L = luaL_newstate();
  int fd, frames, ok, rc, failed = 0;
  if (L == NULL) {
    fprintf(stderr, "lpar_embed: cannot create a Lua state\n");
    return 2;
  }
  luaL_openlibs(L);
  luaL_requiref(L, "lpar", luaopen_lpar, 0); /* require "lpar" finds it */
  lua_pop(L, 1);
  luaL_newlib(L, hostfuncs);
  lua_setglobal(L, "host");
  if (luaL_loadfile(L, script) != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK ||
      !lua_istable(L, -1)) {
    fprintf(stderr, "lpar_embed: %s: %s\n", script,
            lua_isstring(L, -1) ? lua_tostring(L, -1) : "must return a table");
    lua_close(L);
    return 2;
  }
  printf("lpar_embed: %s\n", lpar_version());
  /* 1. start: the script makes its pools, single-threaded */
  if (call(L, "start", 0)) {
    lua_close(L);
    return 1;
  }
  fd = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : -1;
  lua_pop(L, 1);
  /* 2. the render thread */
  if ((rc = pthread_create(&render.thread, NULL, renderloop, &render)) != 0) {
    fprintf(stderr, "lpar_embed: pthread_create: %s\n", strerror(rc));
    lua_close(L);
    return 1;
  }
  /* 3. the frame loop: wait for the pool's fd or the frame budget */
  for (frames = 1; frames <= MAXFRAMES; frames++) {
    int done;
    if (fd >= 0) {
      struct pollfd pfd = {.fd = fd, .events = POLLIN};
      while (poll(&pfd, 1, FRAMEMS) == -1 && errno == EINTR)
        ;
    }
    lua_pushinteger(L, frames);
    if (call(L, "frame", 1)) {
      failed = 1;
      break;
    }
    done = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (done)
      break;
  }
  atomic_store(&render.stop, 1);
  pthread_join(render.thread, NULL);
  /* 4. finish: the script's report */
  ok = 0;
  if (call(L, "finish", 0) == 0) {
    ok = lua_toboolean(L, -1) && !failed && frames <= MAXFRAMES;
    lua_pop(L, 1);
  }
  printf("lpar_embed: %d frames, render thread drew %ld\n", frames,
         (long)atomic_load(&render.ticks));
  printf("lpar_embed: %s\n", ok ? "ok" : "FAILED");
  lua_close(L); /* closes the pools the script left open */
  return ok ? 0 : 1;
}
