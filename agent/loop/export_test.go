package loop

// SetRelease replaces debug.FreeOSMemory in o for a test.
func SetRelease(o *Options, f func()) { o.release = f }
