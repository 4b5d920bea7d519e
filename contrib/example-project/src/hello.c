/* The example project's program: greets whoever is named on the command line. */
#include <stdio.h>
#include <string.h>

static const char *greeting(int argc, char **argv)
{
    return argc > 1 && strlen(argv[1]) > 0 ? argv[1] : "world";
}

int main(int argc, char **argv)
{
    if (printf("Hello, %s!\n", greeting(argc, argv)) < 0)
        return 1;
    return fflush(stdout) == 0 ? 0 : 1;
}
