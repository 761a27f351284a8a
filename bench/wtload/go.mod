module carom/bench/wtload

go 1.26.8

require (
	github.com/quic-go/qpack v0.6.0
	github.com/quic-go/quic-go v0.62.0
)

require (
	golang.org/x/crypto v0.54.0 // indirect
	golang.org/x/net v0.56.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
