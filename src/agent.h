/*
** agent.h: `lpar --worker`, the agent at the far end of a host (see
** hosts.h for the conversation).
*/
#ifndef lpar_agent_h
#define lpar_agent_h

#include "lua.h"

/*
** Serve a parent on stdin and stdout with a pool of 'n' workers, in the
** state L (lpar and lpar.cli loaded), until the parent leaves, is silent
** for too long, or SIGTERM or SIGHUP comes. Returns the exit status.
*/
int lpar_agent_run(lua_State *L, int n);

#endif
